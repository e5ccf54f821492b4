"""SRD-RL training under DeepSpeed ZeRO.

Each optimiser step, on every rank:

1. encode the batch's prompt + reasoning with the VLM once (teacher-forced: language loss);
2. flow matching toward the labelled trajectory's actions (supervised term);
3. sample N trajectories per scene under no_grad from the same prefix (CUDA graph at ZeRO
   0-2 on GPU; eager inside ``deepspeed.zero.GatheredParameters`` at ZeRO-3);
4. score the label and the N samples (visual path safety, label similarity through the
   trust gate, reasoning alignment) and train toward the best with AWR;
5. total = language + traj_loss_weight * traj + rl_loss_weight * AWR
         + consistency_loss_weight * consistency; ``engine.backward``; ``engine.step``.

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

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from srdrl.checkpoint import CHECKPOINTS, export_policy, load_checkpoint, save_checkpoint
from srdrl.cli import parse_config
from srdrl.config import ObjectiveConfig, RewardConfig, TrainConfig, config_summary
from srdrl.data.dataset import JsonlDataset
from srdrl.data.loader import ResumableSampler, VLMCollate
from srdrl.engine import (
    SRDRLModule,
    init_distributed,
    resolve_deepspeed_config,
    train_step,
    warmup_cosine,
    zero_stage_of,
)
from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer
from srdrl.policy.noise import SceneNoise, scene_seed

CONFIG_CLASSES = (TrainConfig, ObjectiveConfig, RewardConfig)


def parse_args(argv: list[str] | None = None):
    """(TrainConfig, ObjectiveConfig, RewardConfig) from --config and the command line."""
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
    train = Path(cfg.data_path)
    if not train.is_file():
        raise FileNotFoundError(f"--data_path {train} does not exist")
    val = Path(cfg.eval_data_path) if cfg.eval_data_path else train.with_name("val.jsonl")
    if cfg.eval_data_path and not val.is_file():
        raise FileNotFoundError(f"--eval_data_path {val} does not exist")
    return train, (val if val.is_file() and val != train else None)


def build_policy(cfg: TrainConfig, texts: list[str]) -> VLAPolicy:
    """A preset built from config (same weights on every rank: seeded) or a local checkpoint."""
    if Path(cfg.policy).is_dir():
        return VLAPolicy.from_pretrained(cfg.policy)
    config = PolicyConfig.preset(cfg.policy)
    torch.manual_seed(cfg.seed)
    return VLAPolicy(config, build_tokenizer(config, texts))


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, objective: ObjectiveConfig, rewards: RewardConfig) -> dict:
    import deepspeed

    rank, world, device = init_distributed()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds_config = resolve_deepspeed_config(cfg, world)
    zero_stage = zero_stage_of(ds_config)
    if rank == 0:
        print("srdrl-train configuration:")
        for c in (cfg, objective, rewards):
            print(config_summary(c))
        print(f"  world_size = {world}, device = {device}, zero_stage = {zero_stage}, "
              f"bf16 = {ds_config.get('bf16', {}).get('enabled', False)}")

    train_path, val_path = prepare_data(cfg, rank)
    dataset = JsonlDataset(train_path)
    global_batch = cfg.per_device_train_batch_size * world
    if len(dataset) < global_batch:
        raise ValueError(f"{train_path} has {len(dataset)} scenes, fewer than one global "
                         f"batch ({cfg.per_device_train_batch_size} x {world} ranks)")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    micro_per_epoch = len(sampler) // cfg.per_device_train_batch_size
    steps_per_epoch = max(micro_per_epoch // cfg.gradient_accumulation_steps, 1)
    total_steps = (cfg.max_steps if cfg.max_steps > 0
                   else math.ceil(cfg.num_train_epochs * steps_per_epoch))

    policy = build_policy(cfg, [r["reasoning"] for r in dataset.records])
    module = SRDRLModule(policy, objective, rewards, zero_stage=zero_stage)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(cfg.warmup_steps, total_steps)),
    )
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)

    if rank == 0 and module.samples_before_forward:
        print("ZeRO-3: parameters are partitioned, so each step gathers them and samples "
              "eagerly before the forward pass (no CUDA graph)")
    elif rank == 0 and device.type == "cuda" and objective.use_cuda_graph:
        print(f"ZeRO-{zero_stage}: sampling replays a CUDA graph captured after "
              "deepspeed.initialize")

    progress = {"global_step": 0, "epoch": 0, "micro_in_epoch": 0}
    if cfg.resume:
        loaded = load_checkpoint(engine, out, rank)
        if loaded is not None:
            progress.update({k: loaded[k] for k in progress})
            if rank == 0:
                print(f"resumed from step {progress['global_step']}")
        elif rank == 0:
            print(f"--resume: no checkpoint in {out / CHECKPOINTS}, starting fresh")

    writer = metrics_file = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
        metrics_file = open(out / "metrics.jsonl", "a")
    bar = tqdm(total=total_steps, initial=progress["global_step"], disable=rank != 0,
               desc="train", unit="step", dynamic_ncols=True)

    collate_fn = VLMCollate(engine.module.policy.input_builder)
    sums: dict[str, float] = {}
    count, step_start = 0, time.perf_counter()
    last = {}
    stop_at = total_steps if cfg.stop_after_steps < 0 else min(cfg.stop_after_steps, total_steps)
    while progress["global_step"] < stop_at:
        sampler.set_epoch(progress["epoch"])
        skip = progress["micro_in_epoch"] * cfg.per_device_train_batch_size
        loader = DataLoader(dataset, batch_size=cfg.per_device_train_batch_size,
                            sampler=ResumableSampler(sampler, skip), collate_fn=collate_fn,
                            num_workers=cfg.dataloader_workers,
                            persistent_workers=False)
        for batch in loader:
            # noise keyed by (seed, epoch, scene): independent of ranks and micro-batches
            noise = SceneNoise([scene_seed(cfg.seed, progress["epoch"], i)
                                for i in batch["index"]])
            _, metrics = train_step(engine, batch, noise)
            progress["micro_in_epoch"] += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            if engine.global_steps == progress["global_step"]:
                continue  # inside a gradient accumulation window
            progress["global_step"] = engine.global_steps
            bar.update()
            step = progress["global_step"]
            if step % cfg.logging_steps == 0 or step == total_steps:
                last = log_step(sums, count, step, time.perf_counter() - step_start,
                                global_batch * cfg.gradient_accumulation_steps,
                                scheduler.get_last_lr()[0], writer, metrics_file, bar, rank)
                sums, count = {}, 0
            step_start = time.perf_counter()
            stopping = step >= total_steps or step == cfg.stop_after_steps
            if (cfg.save_steps and step % cfg.save_steps == 0) or stopping:
                save_checkpoint(engine, out, progress, rank)
            if stopping:
                break
        else:
            progress["epoch"] += 1
            progress["micro_in_epoch"] = 0
    bar.close()
    if metrics_file is not None:
        metrics_file.close()
        writer.close()
    if progress["global_step"] < total_steps:  # --stop_after_steps: resume later
        torch.distributed.barrier()
        return {"steps": progress["global_step"], "final_metrics": last, "stopped_early": True}
    exported = export_policy(engine, out, rank, zero_stage)
    summary = {"steps": progress["global_step"], "final_metrics": last,
               "policy": str(exported)}
    if cfg.eval_samples > 0 and val_path is not None and rank == 0:
        summary["eval"] = final_evaluation(engine.module.policy, dataset, val_path, cfg,
                                           rewards, out)
    torch.distributed.barrier()
    return summary


def final_evaluation(policy, train_set, val_path, cfg, rewards, out: Path) -> dict:
    """The validation metrics and, when the training data says which labels are noisy,
    how the self-check (visual safety, trust gate) judged the training labels."""
    from srdrl.evaluate import (
        evaluate_policy,
        gate_diagnostics,
        print_gate_summary,
        print_summary,
    )

    report = evaluate_policy(policy, JsonlDataset(val_path), num_samples=cfg.eval_samples,
                             rewards=rewards)
    print_summary(report)
    if all("label_noisy" in r["eval"] for r in train_set.records):
        report["gate_diagnostics"] = gate_diagnostics(train_set, rewards)
        print_gate_summary(report["gate_diagnostics"])
    (out / "eval_report.json").write_text(json.dumps(report, indent=2))
    return report


def log_step(sums, count, step, dt, scenes_per_step, lr, writer, metrics_file, bar, rank):
    """Average the step's micro-batch metrics over micro-steps and ranks; rank 0 logs."""
    keys = sorted(sums)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")  # NCCL reduces device tensors only
    values = torch.tensor([sums[k] / count for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    values /= torch.distributed.get_world_size()
    metrics = dict(zip(keys, values.cpu().tolist(), strict=True))
    metrics.update(step=step, lr=lr, step_time_s=dt, scenes_per_s=scenes_per_step / max(dt, 1e-9))
    if rank == 0:
        order = ["loss", "language_loss", "traj_loss", "awr_loss", "consistency_loss",
                 "reward_mean", "reward_best", "gt_is_best", "safety", "gt_sim", "reasoning",
                 "gate_fired", "awr_weight_mean"]
        line = " ".join(f"{k}={metrics[k]:.4g}" for k in order if k in metrics)
        bar.write(f"step {step} {line} lr={lr:.3g} dt={dt:.2f}s "
                  f"scenes/s={metrics['scenes_per_s']:.1f}")
        for k, v in metrics.items():
            writer.add_scalar(k, v, step)
        metrics_file.write(json.dumps(metrics) + "\n")
        metrics_file.flush()
    return metrics


def main(argv: list[str] | None = None) -> None:
    cfg, objective, rewards = parse_args(argv if argv is not None else sys.argv[1:])
    summary = train(cfg, objective, rewards)
    if torch.distributed.get_rank() == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
