"""The DeepSpeed side of training: config, process group, the wrapped module, one step.

``SRDRLModule`` is what ``deepspeed.initialize`` wraps: the policy, the consistency heads,
and the objective/reward configs bound once at construction, plus the two functions the
objective calls (``sampler``, ``scorer``), which tests and benchmarks replace through the
constructor. ``train_step`` is the one optimiser micro-step used by the loop
(``srdrl.train``) and by ``benchmarks/bench_train_step.py``.

Sampling at every ZeRO stage happens in ``SRDRLModule.sample_candidates``: at stages 0-2
the parameters are whole, so the objective samples inside the forward pass from the
step's own prefix (replayed from a CUDA graph on GPU); at stage 3 they are partitioned,
so the step first gathers them and samples eagerly (docs/DESIGN.md, "Sampling and CUDA
graphs").
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
from srdrl.objective import ConsistencyHeads, srdrl_loss
from srdrl.policy import VLAPolicy, sample_trajectories
from srdrl.rewards import score_candidates
from srdrl.timing import NULL_TIMER

DEFAULT_DEEPSPEED_CONFIG = Path(__file__).with_name("ds_config.json")
"""The built-in DeepSpeed config (the repository's top-level ds_config.json, installed
inside the package), used when --deepspeed_config is not given."""


# --------------------------------------------------------------------------- configuration


def resolve_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """Read the JSON config and fill in what the flags decide."""
    path = Path(cfg.deepspeed_config or DEFAULT_DEEPSPEED_CONFIG)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path} (--deepspeed_config)")
    ds = json.loads(path.read_text())
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    if ds.get("train_batch_size", "auto") not in ("auto", global_batch):
        raise ValueError(
            f"{path}: train_batch_size {ds['train_batch_size']} is not per_device_train_batch_"
            f"size ({cfg.per_device_train_batch_size}) x gradient_accumulation_steps "
            f"({cfg.gradient_accumulation_steps}) x world size ({world_size}) = "
            f"{global_batch}; remove it from the config (the flags decide) or make them agree")
    ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds["train_batch_size"] = global_batch
    zero = ds.setdefault("zero_optimization", {})
    if cfg.zero_stage is not None:
        zero["stage"] = cfg.zero_stage
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ValueError(f"{path}: unknown ZeRO stage {zero.get('stage')!r}; use 0, 1, 2 or 3")
    ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    ds["optimizer"].setdefault("params", {})["lr"] = cfg.learning_rate
    for key in ("bf16", "fp16"):
        if ds.get(key, {}).get("enabled") == "auto":
            ds[key]["enabled"] = torch.cuda.is_available() and key == "bf16"
    ds.pop("scheduler", None)  # the schedule is ours (warm-up + cosine), saved with the engine
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


class SRDRLModule(nn.Module):
    """What DeepSpeed wraps: the policy and the consistency heads; forward is the loss.

    ``sampler`` has the signature of ``srdrl.policy.sample_trajectories`` and ``scorer``
    that of ``srdrl.rewards.score_candidates``; ``zero_stage`` decides where sampling runs.
    """

    def __init__(self, policy: VLAPolicy, objective: ObjectiveConfig, rewards: RewardConfig,
                 *, zero_stage: int = 0, sampler=sample_trajectories, scorer=score_candidates):
        super().__init__()
        self.policy = policy
        self.heads = ConsistencyHeads.for_policy(policy)
        self.objective, self.rewards = objective, rewards
        self.zero_stage = zero_stage
        self.sampler, self.scorer = sampler, scorer

    @property
    def samples_before_forward(self) -> bool:
        """ZeRO-3 with an RL term: candidates are drawn before the forward pass, with the
        partitioned parameters gathered (no CUDA graph)."""
        return self.zero_stage == 3 and self.objective.rl_loss_weight > 0

    @torch.no_grad()
    def sample_candidates(self, batch: dict, generator, prefix=None) -> tuple:
        """Actions (B, N, 64, 2) and trajectories (B, N, 64, 3) of N policy samples per
        scene, wherever this ZeRO stage keeps the parameters."""
        o = self.objective
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.policy.parameters())):
                return self.sampler(self.policy, batch, o.num_trajectory_samples,
                                    steps=o.flow_steps, noise_scale_step=o.noise_scale_step,
                                    generator=generator, use_cuda_graph=False)
        return self.sampler(self.policy, batch, o.num_trajectory_samples, steps=o.flow_steps,
                            noise_scale_step=o.noise_scale_step, generator=generator,
                            use_cuda_graph=o.use_cuda_graph, prefix=prefix)

    def forward(self, batch: dict, generator, samples=None, timer=NULL_TIMER):
        return srdrl_loss(self.policy, self.heads, batch, self.objective, self.rewards,
                          generator, samples=samples, timer=timer,
                          sample_candidates=self.sample_candidates, scorer=self.scorer)


def train_step(engine, batch: dict, generator, timer=NULL_TIMER) -> tuple[torch.Tensor, dict]:
    """One micro-step: (ZeRO-3: gathered sampling), forward, backward, optimiser step
    (DeepSpeed applies it at the end of an accumulation window). Returns the loss and the
    step's metrics (floats)."""
    module = engine.module
    samples = None
    if module.samples_before_forward:
        with timer.section("sampling"):
            samples = module.sample_candidates(batch, generator)
    loss, metrics = engine(batch, generator, samples, timer)
    with timer.section("backward"):
        engine.backward(loss)
    with timer.section("optimizer_step"):
        engine.step()
    return loss, metrics
