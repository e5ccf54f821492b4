"""SRD-RL training under DeepSpeed ZeRO.

Each optimiser step, on every rank:

1. encode the batch's prompt + reasoning with the VLM once (teacher-forced: language loss);
2. flow matching toward the labelled trajectory's actions (supervised term);
3. sample N trajectories per scene under no_grad from the same prefix, inside the forward
   pass (CUDA graph at ZeRO 0-2 on GPU; eager at ZeRO-3, its hooks gathering parameters);
4. score the label and the N samples (visual path safety, label similarity through the
   trust gate, reasoning alignment) and train toward the best with AWR;
5. total = language + traj_loss_weight * traj + rl_loss_weight * AWR
         + consistency_loss_weight * consistency; ``engine.backward``; ``engine.step``.

Failures are loud: a non-finite loss or gradient stops the run with the step named and
nothing saved after the last good checkpoint; SIGINT/SIGTERM save a checkpoint at the next
optimiser step and stop; a used output_dir is refused without --resume or
--overwrite_output_dir; user errors end in one line and exit code 2.

Launch:

    srdrl-train                                   # one process, no launcher; CPU or 1 GPU
    deepspeed --num_gpus 8 --module srdrl.train --deepspeed_config my_ds_config.json \
        --data_path data/train.jsonl --output_dir runs/x
    deepspeed --hostfile hosts --module srdrl.train ...     # several machines

With no --data_path the synthetic off-road data is generated in output_dir/data. Every
flag is listed by ``srdrl-train --help``; ``--config run.yaml`` reads them from a file.
The step itself lives in ``srdrl.engine``, checkpoints in ``srdrl.checkpoint``
(docs/DESIGN.md, "One training step").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from srdrl.anchors import records_vocabulary
from srdrl.checkpoint import (
    export_policy,
    load_checkpoint,
    save_checkpoint,
    write_policy,
)
from srdrl.cli import parse_config
from srdrl.config import ObjectiveConfig, RewardConfig, TrainConfig, config_summary
from srdrl.data.dataset import JsonlDataset, check_data_file
from srdrl.data.loader import ResumableSampler, VLMCollate, ignore_sigint
from srdrl.engine import (
    DivergenceGuard,
    SRDRLModule,
    init_distributed,
    initialize_engine,
    resolve_deepspeed_config,
    train_step,
    warmup_cosine,
    zero_stage_of,
)
from srdrl.errors import UserError, run_command
from srdrl.metrics_log import MetricsLog
from srdrl.optimizer import DEFAULT_OPTIMIZER
from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer
from srdrl.policy.compiled_layers import check_compile_layers, compile_policy_layers
from srdrl.policy.fused_kernels import apply_liger_kernels, check_liger_device
from srdrl.policy.kv_recompute import set_vlm_gradient_checkpointing
from srdrl.policy.lora import (
    LoraSettings,
    adapted_parts,
    apply_lora,
    merge_lora,
    save_lora_adapters,
)
from srdrl.policy.noise import SceneNoise, scene_seed
from srdrl.run_folder import CHECKPOINTS, TRAIN_CONFIG, prepare_output_dir, write_json

CONFIG_CLASSES = (TrainConfig, ObjectiveConfig, RewardConfig, LoraSettings)
ADAPTERS = "adapters"


def parse_args(argv: list[str] | None = None):
    """(TrainConfig, ObjectiveConfig, RewardConfig, LoraSettings) from --config and the
    command line."""
    return parse_config(CONFIG_CLASSES, argv, prog="srdrl-train",
                        description=__doc__.split("\n\n")[0])


# --------------------------------------------------------------------------- set-up


def prepare_data(cfg: TrainConfig, rank: int) -> tuple[Path, Path | None]:
    """The training and validation JSONL paths, generating synthetic data if none given."""
    if cfg.data_path is None:
        root = Path(cfg.output_dir) / "data"
        if rank == 0 and not (root / "train.jsonl").is_file():
            from srdrl.data.synthetic import SyntheticDataConfig, make_dataset

            print(f"no --data_path: generating {cfg.synthetic_scenes} synthetic scenes in {root}")
            make_dataset(SyntheticDataConfig(output_dir=str(root),
                                             num_scenes=cfg.synthetic_scenes,
                                             label_noise=cfg.synthetic_label_noise,
                                             seed=cfg.seed))
        torch.distributed.barrier()
        return root / "train.jsonl", root / "val.jsonl"
    train = check_data_file(cfg.data_path, "--data_path")
    if cfg.eval_data_path:
        return train, check_data_file(cfg.eval_data_path, "--eval_data_path")
    val = train.with_name("val.jsonl")
    return train, (val if val.is_file() and val != train else None)


def build_policy(cfg: TrainConfig, texts: list[str]) -> VLAPolicy:
    """A preset built from config (same weights on every rank: seeded) or a local checkpoint."""
    if Path(cfg.policy).is_dir():
        return VLAPolicy.from_pretrained(cfg.policy)
    config = PolicyConfig.preset(cfg.policy)
    torch.manual_seed(cfg.seed)
    return VLAPolicy(config, build_tokenizer(config, texts))


@dataclasses.dataclass
class EpochPlan:
    """Whole accumulation windows per epoch: the micro-batches past the last full window
    (and the scenes past the last full micro-batch) are left out of that epoch, so every
    micro-batch has the same size and no window straddles two epochs."""

    micro_batches: int
    steps_per_epoch: int
    total_steps: int


def plan_epochs(scenes_per_rank: int, cfg: TrainConfig) -> EpochPlan:
    micro = scenes_per_rank // cfg.per_device_train_batch_size
    steps = micro // cfg.gradient_accumulation_steps
    if steps < 1:
        raise UserError(
            f"one epoch has {scenes_per_rank} scenes per rank, fewer than one optimiser step "
            f"({cfg.per_device_train_batch_size} scenes x {cfg.gradient_accumulation_steps} "
            "accumulation steps); add data or lower the batch size")
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps)
    return EpochPlan(steps * cfg.gradient_accumulation_steps, steps, total)


class StopSignal:
    """SIGINT/SIGTERM ask the loop to save and stop at the next optimiser step; every rank
    stops at the same step (the request is agreed over the group)."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self) -> int:
        flag = torch.tensor([self.signum], dtype=torch.int64,
                            device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


# --------------------------------------------------------------------------- the loop


def write_checkpoint_policy(policy: VLAPolicy, folder: Path) -> None:
    """A loadable policy in ``folder`` (rank 0, parameters whole): with LoRA, the adapters
    in peft's format under ``folder/adapters`` and the weights with the adapters merged
    into a copy (the live policy keeps training its adapters)."""
    if not adapted_parts(policy):
        write_policy(policy, folder)
        return
    import copy

    merged = copy.deepcopy(policy)
    merge_lora(merged)
    write_policy(merged, folder)
    save_lora_adapters(policy, folder / ADAPTERS)


def check_same_optimizer(loaded: dict, optimizer: str) -> None:
    """A checkpoint's optimiser state resumes only under the optimiser that wrote it (torch
    restores a param group's fused/foreach flags from the file); checkpoints from before
    --optimizer existed are deepspeed_adamw's."""
    saved = loaded.get("srdrl_optimizer", DEFAULT_OPTIMIZER)
    if saved != optimizer:
        raise UserError(f"the checkpoint was saved with --optimizer {saved}, this run asks for "
                        f"{optimizer}; resume with --optimizer {saved}")


def training_anchors(dataset: JsonlDataset, policy: VLAPolicy, k: int, train_path, rank: int,
                     device: torch.device) -> torch.Tensor | None:
    """The anchor vocabulary (k, 64, 2) of the training labels on ``device`` (moved once,
    not every step), or None when k is 0. Every rank computes the same one
    (deterministic), and so does a resumed run."""
    if k == 0:
        return None
    if len(dataset) < k:
        raise UserError(f"{train_path}: --num_anchors {k} needs at least {k} training "
                        f"scenes, the file has {len(dataset)}")
    start = time.perf_counter()
    anchors = records_vocabulary(dataset.records, policy.action_space, k)
    if rank == 0:
        print(f"anchors: {k} k-means centres of {len(dataset)} labels' actions "
              f"({time.perf_counter() - start:.1f} s)")
    return anchors.to(device)


def train(cfg: TrainConfig, objective: ObjectiveConfig, rewards: RewardConfig,
          lora: LoraSettings | None = None) -> dict:
    rank, world, device = init_distributed()
    if cfg.liger_kernels:
        check_liger_device(device)
    out = Path(cfg.output_dir)
    resuming = cfg.resume  # --resume_from_checkpoint PATH implies it
    prepare_output_dir(out, resume=resuming, overwrite=cfg.overwrite_output_dir, rank=rank)
    ds_config = resolve_deepspeed_config(cfg, world)
    zero_stage = zero_stage_of(ds_config)
    if cfg.compile_layers:
        check_compile_layers(zero_stage, cfg.liger_kernels)
    lora = lora or LoraSettings()
    full_config = {"train": dataclasses.asdict(cfg), "objective": dataclasses.asdict(objective),
                   "rewards": dataclasses.asdict(rewards), "lora": dataclasses.asdict(lora),
                   "deepspeed": ds_config, "world_size": world}
    if rank == 0:
        print("srdrl-train configuration:")
        for c in (cfg, objective, rewards, lora):
            print(config_summary(c))
        print(f"  world_size = {world}, device = {device}, zero_stage = {zero_stage}, "
              f"bf16 = {ds_config.get('bf16', {}).get('enabled', False)}")
        write_json(out / TRAIN_CONFIG, full_config)

    train_path, val_path = prepare_data(cfg, rank)
    dataset = JsonlDataset(train_path, cfg.frame_paths_layout)
    if len(dataset) < cfg.per_device_train_batch_size * world:
        raise UserError(f"{train_path} has {len(dataset)} scenes, fewer than one global "
                        f"batch ({cfg.per_device_train_batch_size} x {world} ranks)")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    plan = plan_epochs(len(sampler), cfg)
    if rank == 0 and cfg.per_device_train_batch_size * world == 1 and \
            objective.consistency_loss_weight > 0:
        print("note: the consistency loss contrasts the scenes of a step; with one scene per "
              "step it is 0 (use at least 2 scenes per step across ranks)")

    policy = build_policy(cfg, [r["reasoning"] for r in dataset.records])
    counts = apply_lora(policy, lora)  # None without --use_peft
    if rank == 0 and counts is not None:
        print(f"LoRA: {counts}")
    if cfg.liger_kernels:
        fused = apply_liger_kernels(policy.to(device))
        if rank == 0:
            print(f"Liger kernels: {fused}")
    if cfg.compile_layers:
        compiled = compile_policy_layers(policy)
        if rank == 0:
            print(f"torch.compile (inductor), module by module: {compiled}; the first steps "
                  "compile")
    if cfg.gradient_checkpointing:
        set_vlm_gradient_checkpointing(policy)
    anchors = training_anchors(dataset, policy, objective.num_anchors, train_path, rank,
                               device)
    module = SRDRLModule(policy, objective, rewards, zero_stage=zero_stage,
                         zero3_gather_expert_whole=cfg.zero3_gather_expert_whole,
                         zero3_gather_vlm_layers_whole=cfg.zero3_gather_vlm_layers_whole,
                         zero3_sampling_replica=cfg.zero3_sampling_replica,
                         anchors=anchors)
    engine, scheduler = initialize_engine(module, ds_config, cfg.optimizer,
                                          warmup_cosine(cfg.warmup_steps, plan.total_steps))
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    if rank == 0 and module.sampling_replica is not None:  # ZeRO-3, sampling for the RL term
        print("ZeRO-3: sampling reads a copy of the expert refreshed before each step "
              "(--zero3_sampling_replica)" + (", replaying a CUDA graph"
                                              if device.type == "cuda"
                                              and objective.use_cuda_graph else ""))
    elif rank == 0 and zero_stage == 3 and objective.rl_loss_weight > 0:
        print("ZeRO-3: parameters are partitioned, so sampling runs eagerly inside the forward "
              "pass, ZeRO-3 gathering the expert's parameters as it runs (no CUDA graph; "
              "--no_zero3_sampling_replica)")
    elif rank == 0 and device.type == "cuda" and objective.use_cuda_graph:
        print(f"ZeRO-{zero_stage}: sampling replays a CUDA graph captured after "
              "deepspeed.initialize")

    progress = {"global_step": 0, "epoch": 0, "micro_in_epoch": 0}
    pending_metrics = None
    if resuming:
        path = Path(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
        loaded = load_checkpoint(engine, out, rank, path=path)
        if loaded is not None:
            check_same_optimizer(loaded, cfg.optimizer)
            progress.update({k: loaded[k] for k in progress})
            pending_metrics = loaded.get("metrics_pending")
            if rank == 0:
                print(f"resumed from step {progress['global_step']}")
        elif rank == 0:
            print(f"--resume: no complete checkpoint in {out / CHECKPOINTS}, starting fresh")

    log = MetricsLog(out, rank, world, resumed_step=progress["global_step"])
    log.load_state(pending_metrics)
    guard = DivergenceGuard(cfg.max_skipped_steps)
    stop = StopSignal()
    bar = tqdm(total=plan.total_steps, initial=progress["global_step"], disable=rank != 0,
               desc="train", unit="step", dynamic_ncols=True)
    collate_fn = VLMCollate(engine.module.policy.input_builder)
    scenes_per_step = cfg.per_device_train_batch_size * world * cfg.gradient_accumulation_steps

    def checkpoint():
        # not "optimizer": DeepSpeed's own state under that name shares the client-state dict
        state = {**progress, "srdrl_optimizer": cfg.optimizer, "metrics_pending": log.state()}
        save_checkpoint(engine, out, state, rank, save_total_limit=cfg.save_total_limit,
                        train_config=full_config,
                        export=functools.partial(write_checkpoint_policy,
                                                 engine.module.policy))

    last, step_start = {}, time.perf_counter()
    stop_at = min(cfg.stop_after_steps, plan.total_steps) if cfg.stop_after_steps > 0 \
        else plan.total_steps
    interrupted = 0
    try:
        while progress["global_step"] < stop_at and not interrupted:
            sampler.set_epoch(progress["epoch"])
            skip = progress["micro_in_epoch"] * cfg.per_device_train_batch_size
            take = plan.micro_batches * cfg.per_device_train_batch_size
            loader = DataLoader(dataset, batch_size=cfg.per_device_train_batch_size,
                                sampler=ResumableSampler(sampler, skip, take), drop_last=True,
                                collate_fn=collate_fn, num_workers=cfg.dataloader_workers,
                                worker_init_fn=ignore_sigint if cfg.dataloader_workers else None,
                                pin_memory=device.type == "cuda")  # async copies to the GPU
            for batch in loader:
                # noise keyed by (seed, epoch, scene): independent of ranks and micro-batches
                noise = SceneNoise([scene_seed(cfg.seed, progress["epoch"], i)
                                    for i in batch["index"]])
                _, metrics = train_step(engine, batch, noise, guard=guard)
                progress["micro_in_epoch"] += 1
                log.add(metrics)
                if engine.global_steps == progress["global_step"]:
                    continue  # inside a gradient accumulation window
                progress["global_step"] = step = engine.global_steps
                bar.update()
                if step % cfg.logging_steps == 0 or step == plan.total_steps:
                    last = log.log(step, time.perf_counter() - step_start, scenes_per_step,
                                   scheduler.get_last_lr()[0], bar)
                step_start = time.perf_counter()
                interrupted = stop.agreed() if world > 1 else stop.signum
                if progress["micro_in_epoch"] == plan.micro_batches:
                    progress["epoch"] += 1
                    progress["micro_in_epoch"] = 0
                if ((cfg.save_steps and step % cfg.save_steps == 0) or step >= stop_at
                        or interrupted):
                    checkpoint()
                if step >= stop_at or interrupted:
                    break
    finally:
        bar.close()
        log.close()
    if interrupted:
        name = signal.Signals(interrupted).name
        if rank == 0:
            print(f"{name}: saved a checkpoint at step {progress['global_step']} in "
                  f"{out / CHECKPOINTS}; continue with --resume", file=sys.stderr)
        raise SystemExit(128 + interrupted)
    if progress["global_step"] < plan.total_steps:  # --stop_after_steps: resume later
        torch.distributed.barrier()
        return {"steps": progress["global_step"], "final_metrics": last, "stopped_early": True}
    # with LoRA: merged weights, and the adapters in peft's format under policy/adapters
    exported = export_policy(engine, out, rank, zero_stage, writer=write_checkpoint_policy)
    summary = {"steps": progress["global_step"], "final_metrics": last,
               "policy": str(exported)}
    if cfg.eval_samples > 0 and val_path is not None and rank == 0:
        summary["eval"] = final_evaluation(exported, dataset, val_path, cfg, rewards, out)
    torch.distributed.barrier()
    return summary


def final_evaluation(exported: Path, train_set, val_path, cfg, rewards, out: Path) -> dict:
    """The validation metrics of the exported policy (read back from disk, so no rank needs
    the engine's partitioned parameters) and, when the training data says which labels
    are noisy, how the self-check (visual safety, trust gate) judged the training labels."""
    from srdrl.evaluate import (
        evaluate_policy,
        gate_diagnostics,
        print_gate_summary,
        print_summary,
    )

    device = "cuda" if torch.cuda.is_available() else None
    policy = VLAPolicy.from_pretrained(exported, device=device)
    report = evaluate_policy(policy, JsonlDataset(val_path, cfg.frame_paths_layout),
                             num_samples=cfg.eval_samples, rewards=rewards)
    print_summary(report)
    if all("label_noisy" in r["eval"] for r in train_set.records):
        report["gate_diagnostics"] = gate_diagnostics(train_set, rewards)
        print_gate_summary(report["gate_diagnostics"])
    write_json(out / "eval_report.json", report)
    return report


def main(argv: list[str] | None = None) -> None:
    def run():
        cfg, objective, rewards, lora = parse_args(argv if argv is not None else sys.argv[1:])
        summary = train(cfg, objective, rewards, lora)
        if torch.distributed.get_rank() == 0:
            print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
        torch.distributed.destroy_process_group()

    run_command("srdrl-train", run)


if __name__ == "__main__":
    main()
