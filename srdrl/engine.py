"""The DeepSpeed side of training: config, process group, the wrapped module, one step.

``SRDRLModule`` is what ``deepspeed.initialize`` wraps: the policy, the consistency heads,
and the objective/reward configs bound once at construction, plus the two functions the
objective calls (``sampler``, ``scorer``), which tests and benchmarks replace through the
constructor. ``train_step`` is the one optimiser micro-step used by the loop
(``srdrl.train``) and by ``benchmarks/bench_train_step.py``.

Sampling at every ZeRO stage happens in ``SRDRLModule.sample_candidates``, inside the
forward pass, after the supervised terms and from the step's own prefix (so a seed draws
the same noise in the same order at every stage, and the prefix is encoded once): at
stages 0-2 the parameters are whole and the Euler loop is replayed from a CUDA graph on
GPU; at stage 3 they are partitioned and the loop runs eagerly, ZeRO-3's hooks gathering
each parameter as the expert uses it, or, with ``zero3_sampling_replica``, reads a copy of
the expert refreshed before each forward pass and replays a graph again (docs/DESIGN.md,
"Sampling and CUDA graphs").

``DivergenceGuard`` stops a run whose loss or gradients stop being finite
(docs/DESIGN.md, "The DeepSpeed engine").
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import torch
from torch import nn

from srdrl.config import ObjectiveConfig, RewardConfig, TrainConfig
from srdrl.errors import ConfigError, UserError
from srdrl.objective import ConsistencyHeads, srdrl_loss
from srdrl.optimizer import DEFAULT_OPTIMIZER, client_adamw_settings, fused_adamw_factory
from srdrl.policy import VLAPolicy, sample_trajectories
from srdrl.policy.replica import SamplingReplica
from srdrl.rewards import score_candidates
from srdrl.timing import NULL_TIMER

DEFAULT_DEEPSPEED_CONFIG = Path(__file__).with_name("ds_config.json")
"""The built-in DeepSpeed config (the repository's top-level ds_config.json, installed
inside the package), used when --deepspeed_config is not given."""


# --------------------------------------------------------------------------- configuration


def read_deepspeed_config(path: Path) -> dict:
    """The JSON object in ``path``; ConfigError naming the file (and line) otherwise."""
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path} (--deepspeed_config)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON in the DeepSpeed config "
                          f"({e.msg} at column {e.colno})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed config is a JSON object, got a "
                          f"{type(ds).__name__}")
    return ds


def _agree(path: Path, key: str, in_file, flag: str, value) -> None:
    """A value set both in the user's file and by a flag must be the same."""
    if in_file not in (None, "auto") and in_file != value:
        raise ConfigError(f"{path}: {key} = {in_file!r} conflicts with {flag} = {value!r}; "
                          f"remove it from the file or make them agree")


def resolve_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """Read the JSON config and fill in what the flags decide.

    The built-in file's values are defaults that the flags replace. In a file of the user's
    (--deepspeed_config), a batch size, accumulation, learning rate or ZeRO stage that
    disagrees with a flag is an error naming both, and a ``scheduler`` block is refused
    (srdrl's schedule is --warmup_steps then cosine, saved with the engine). With
    ``--optimizer torch_fused_adamw`` the optimizer block must describe AdamW
    (``srdrl.optimizer.client_adamw_settings``).
    """
    builtin = cfg.deepspeed_config is None
    path = Path(cfg.deepspeed_config or DEFAULT_DEEPSPEED_CONFIG)
    ds = read_deepspeed_config(path)
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    if ds.get("train_batch_size", "auto") not in ("auto", global_batch):
        raise ConfigError(
            f"{path}: train_batch_size {ds['train_batch_size']} is not per_device_train_batch_"
            f"size ({cfg.per_device_train_batch_size}) x gradient_accumulation_steps "
            f"({cfg.gradient_accumulation_steps}) x world size ({world_size}) = "
            f"{global_batch}; remove it from the config (the flags decide) or make them agree")
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict) or not isinstance(ds.get("optimizer", {}), dict):
        raise ConfigError(f"{path}: zero_optimization and optimizer must be JSON objects")
    if not builtin:
        _agree(path, "train_micro_batch_size_per_gpu", ds.get("train_micro_batch_size_per_gpu"),
               "--per_device_train_batch_size", cfg.per_device_train_batch_size)
        _agree(path, "gradient_accumulation_steps", ds.get("gradient_accumulation_steps"),
               "--gradient_accumulation_steps", cfg.gradient_accumulation_steps)
        _agree(path, "optimizer.params.lr",
               ds.get("optimizer", {}).get("params", {}).get("lr"),
               "--learning_rate", cfg.learning_rate)
        if cfg.zero_stage is not None:
            _agree(path, "zero_optimization.stage", zero.get("stage"), "--zero_stage",
                   cfg.zero_stage)
        if "scheduler" in ds:
            raise ConfigError(
                f"{path}: a 'scheduler' block is not used: srdrl's schedule is linear warm-up "
                f"(--warmup_steps) then cosine to 10% (--learning_rate is the peak); remove it")
    ds.pop("scheduler", None)
    ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds["train_batch_size"] = global_batch
    if cfg.zero_stage is not None:
        zero["stage"] = cfg.zero_stage
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: unknown ZeRO stage {zero.get('stage')!r}; use 0, 1, 2 or 3")
    ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    ds["optimizer"].setdefault("params", {})["lr"] = cfg.learning_rate
    for key in ("bf16", "fp16"):
        if ds.get(key, {}).get("enabled") == "auto":
            ds[key]["enabled"] = torch.cuda.is_available() and key == "bf16"
    if cfg.optimizer != DEFAULT_OPTIMIZER:
        client_adamw_settings(ds, path)  # a conflict fails here, before any work
    return ds


def zero_stage_of(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def warmup_cosine(warmup: int, total: int, floor: float = 0.1):
    """LR factor: linear warm-up over ``warmup`` steps, then cosine down to ``floor``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def initialize_engine(module: nn.Module, ds_config: dict, optimizer: str = DEFAULT_OPTIMIZER,
                      lr_lambda=None):
    """``deepspeed.initialize`` on the module's trainable parameters with the optimiser
    ``optimizer`` names (``srdrl.optimizer``) and, given ``lr_lambda``, a LambdaLR on it;
    returns (engine, scheduler or None)."""
    import deepspeed

    client = None
    if optimizer != DEFAULT_OPTIMIZER:
        client = fused_adamw_factory(client_adamw_settings(ds_config, "the DeepSpeed config"))
        ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
    schedule = None if lr_lambda is None else (
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=ds_config, optimizer=client, lr_scheduler=schedule)
    return engine, scheduler


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the launcher's process group, or make a group of one without a launcher."""
    import deepspeed

    if "RANK" not in os.environ:  # srdrl-train without a launcher
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


# --------------------------------------------------------------------------- the module


def gather_whole(policy: VLAPolicy, expert: bool = True, vlm_layers: bool = False) -> None:
    """At ZeRO-3, let DeepSpeed gather a module's parameters as one unit at each call (a
    ZeRO-3 "leaf module"), not submodule by submodule, for the action expert (sampling
    calls it once per Euler step) and/or each VLM decoder layer and vision block; each
    per-submodule gather runs ZeRO-3's hooks. Call before ``deepspeed.initialize``. A leaf's
    parameters are all live while it runs. DeepSpeed 0.19 allows one differentiated call
    of a leaf module per forward pass (its gradient bucket asserts otherwise), which
    srdrl_loss keeps: the label's and the AWR's flow matching share one expert call, and
    the VLM runs once with gradients (generation runs without)."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = [type(policy.expert)] if expert else []
    if vlm_layers:
        model = policy.vlm.model
        layers = [*model.language_model.layers, *model.visual.blocks]
        classes += list({type(layer) for layer in layers})
    if classes:
        set_z3_leaf_modules(policy, classes)


class SRDRLModule(nn.Module):
    """What DeepSpeed wraps: the policy and the consistency heads; forward is the loss.

    ``sampler`` has the signature of ``srdrl.policy.sample_trajectories`` and ``scorer``
    that of ``srdrl.rewards.score_candidates``; ``zero_stage`` decides where sampling runs.
    ``anchors`` (K, 64, 2) is the anchor vocabulary when the objective has ``num_anchors``;
    a plain attribute, not a buffer, so that DeepSpeed's bf16 cast leaves it in float32.
    """

    def __init__(self, policy: VLAPolicy, objective: ObjectiveConfig, rewards: RewardConfig,
                 *, zero_stage: int = 0, sampler=sample_trajectories, scorer=score_candidates,
                 zero3_gather_expert_whole: bool = True,
                 zero3_gather_vlm_layers_whole: bool = False,
                 zero3_sampling_replica: bool = False,
                 anchors: torch.Tensor | None = None):
        super().__init__()
        self.policy = policy
        self.anchors = anchors
        self.heads = ConsistencyHeads.for_policy(policy)
        self.objective, self.rewards = objective, rewards
        self.zero_stage = zero_stage
        self.sampler, self.scorer = sampler, scorer
        # At ZeRO-3, a copy of the sampling side that the sampler's CUDA graph can read
        # (srdrl/policy/replica.py); not a Module, so not a submodule DeepSpeed would wrap.
        self.sampling_replica = (SamplingReplica(policy) if zero_stage == 3
                                 and zero3_sampling_replica and objective.rl_loss_weight > 0
                                 else None)
        if zero_stage == 3:
            gather_whole(policy, zero3_gather_expert_whole, zero3_gather_vlm_layers_whole)

    def refresh_sampling_replica(self, timer=NULL_TIMER, weights_version=None) -> None:
        """Before the forward pass (``train_step``): copy the current sampling weights into
        the ZeRO-3 sampling replica, gathered for the copy and released after (timed as
        sampling, whose cost it is); nothing without a replica. ``weights_version``: the
        optimiser steps taken so far (``engine.global_steps``); a replica that already
        holds that step's weights is reused without a copy (the micro-steps of gradient
        accumulation). None always copies."""
        replica = self.sampling_replica
        if replica is None:
            return
        if replica.holds(weights_version):
            replica.reuse()
            return
        import deepspeed

        with timer.section("sampling"), deepspeed.zero.GatheredParameters(replica.sources()):
            replica.refresh(weights_version)

    @torch.no_grad()
    def sample_candidates(self, batch: dict, generator, prefix) -> tuple:
        """Actions (B, N, 64, 2) and trajectories (B, N, 64, 3) of N policy samples per
        scene from this step's ``prefix``. At ZeRO-3 with the sampling replica, the loop
        reads the replica (refreshed before this forward pass) and replays a CUDA graph as
        at ZeRO-0-2; without it the loop runs eagerly and ZeRO-3's own module hooks gather
        the partitioned parameters as the expert runs (the whole expert at once with
        ``zero3_gather_expert_whole``; an explicit ``GatheredParameters`` cannot be
        released inside the engine's forward pass while the module is still active)."""
        o = self.objective
        replica = self.sampling_replica and self.sampling_replica.take()
        was_training = self.policy.training
        self.policy.eval()  # no adapter dropout while sampling (nor inside a captured graph)
        try:
            return self.sampler(replica or self.policy, batch, o.num_trajectory_samples,
                                steps=o.flow_steps, noise_scale_step=o.noise_scale_step,
                                generator=generator,
                                use_cuda_graph=o.use_cuda_graph and (
                                    self.zero_stage < 3 or replica is not None),
                                prefix=prefix)
        finally:
            self.policy.train(was_training)

    def forward(self, batch: dict, generator, timer=NULL_TIMER):
        return srdrl_loss(self.policy, self.heads, batch, self.objective, self.rewards,
                          generator, timer=timer, sample_candidates=self.sample_candidates,
                          scorer=self.scorer, anchors=self.anchors)


class DivergenceError(UserError):
    """The run stopped because its loss or gradients were no longer finite."""


class DivergenceGuard:
    """Stops a run at the first non-finite loss, at the first non-finite gradient where
    nothing else would catch it (ZeRO-0: the update would write NaN into the weights), and
    after ``max_skipped_steps`` optimiser steps in a row that DeepSpeed skipped for
    non-finite gradients (ZeRO 1-3 and fp16 loss scaling skip such updates; the schedule
    then stands still)."""

    def __init__(self, max_skipped_steps: int = 3):
        self.max_skipped_steps = max_skipped_steps
        self.skipped_in_a_row = 0
        self._skipped_before = 0

    def check_loss(self, engine, loss: float) -> None:
        if not math.isfinite(loss):
            raise DivergenceError(
                f"training diverged at step {engine.global_steps + 1}: the loss is {loss}; "
                "nothing was updated or saved after the last checkpoint (resume from it "
                "with --resume and a lower --learning_rate)")

    def check_gradients(self, engine) -> None:
        """Before the update, at ZeRO-0 (whole gradients on the parameters)."""
        if engine.zero_optimization_stage() > 0 or not engine.is_gradient_accumulation_boundary():
            return
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack([g.float().norm() for g in grads])
                                             ).all()):
            raise DivergenceError(
                f"training diverged at step {engine.global_steps + 1}: non-finite gradients; "
                "the update was not applied (resume from the last checkpoint with --resume "
                "and a lower --learning_rate)")

    def after_step(self, engine) -> None:
        """After ``engine.step()`` at an accumulation boundary."""
        skipped = engine.skipped_steps
        if skipped > self._skipped_before:
            self.skipped_in_a_row += skipped - self._skipped_before
        else:
            self.skipped_in_a_row = 0
        self._skipped_before = skipped
        if self.skipped_in_a_row >= self.max_skipped_steps:
            raise DivergenceError(
                f"training diverged at step {engine.global_steps}: DeepSpeed skipped the last "
                f"{self.skipped_in_a_row} optimiser steps for non-finite gradients "
                f"(--max_skipped_steps {self.max_skipped_steps}); resume from the last "
                "checkpoint with --resume and a lower --learning_rate")


def train_step(engine, batch: dict, generator, timer=NULL_TIMER, guard: DivergenceGuard | None
               = None) -> tuple[torch.Tensor, dict]:
    """One micro-step: forward (sampling inside), backward, optimiser step (DeepSpeed
    applies it at the end of an accumulation window). Returns the loss and the step's
    metrics (floats). With a ``guard``, a non-finite loss or gradient raises
    ``DivergenceError`` before anything is updated."""
    engine.module.refresh_sampling_replica(timer, engine.global_steps)
    loss, metrics = engine(batch, generator, timer)
    if guard is not None:
        guard.check_loss(engine, metrics["loss"])
    with timer.section("backward"):
        engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    if guard is not None:
        guard.check_gradients(engine)
    with timer.section("optimizer_step"):
        engine.step()
    if guard is not None and boundary:
        guard.after_step(engine)
    return loss, metrics
