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
flag is listed by ``srdrl-train --help``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from srdrl.config import ObjectiveConfig, RewardConfig, TrainConfig, config_summary, field_docs
from srdrl.data.dataset import JsonlDataset, collate
from srdrl.objective import ConsistencyHeads, srdrl_loss
from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer, sample_trajectories
from srdrl.policy.model import VLM_INPUTS_KEY
from srdrl.policy.noise import SceneNoise, scene_seed
from srdrl.timing import NULL_TIMER

DEFAULT_DEEPSPEED_CONFIG = Path(__file__).with_name("ds_config.json")
"""The built-in DeepSpeed config, used when --deepspeed_config is not given."""

CHECKPOINTS = "checkpoints"
EXPORT = "policy"


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None):
    """(TrainConfig, ObjectiveConfig, RewardConfig) from the command line."""
    from transformers import HfArgumentParser

    classes = (TrainConfig, ObjectiveConfig, RewardConfig)
    parser = HfArgumentParser(classes, description=__doc__.split("\n\n")[0])
    docs = {k: v for cls in classes for k, v in field_docs(cls).items()}
    for action in parser._actions:
        if action.dest in docs:
            action.help = docs[action.dest].replace("%", "%%")  # argparse formats help
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # a __post_init__ check
        parser.error(str(e))


def resolve_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """Read the JSON config and fill what the flags decide."""
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


# --------------------------------------------------------------------------- set-up


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


def prepare_data(cfg: TrainConfig, rank: int) -> tuple[Path, Path | None]:
    """The training and validation JSONL paths, generating synthetic data if none given."""
    if cfg.data_path is None:
        root = Path(cfg.output_dir) / "data"
        if rank == 0 and not (root / "train.jsonl").is_file():
            from srdrl.data.synthetic import SyntheticDataConfig, make_dataset

            print(f"no --data_path: generating {cfg.synthetic_scenes} synthetic scenes in {root}")
            make_dataset(SyntheticDataConfig(out=str(root), num_scenes=cfg.synthetic_scenes,
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


class SRDRLModule(nn.Module):
    """What DeepSpeed wraps: the policy and the consistency heads; forward is the loss."""

    def __init__(self, policy: VLAPolicy):
        super().__init__()
        self.policy = policy
        self.heads = ConsistencyHeads.for_policy(policy)

    def forward(self, batch, objective, rewards, generator, samples=None, timer=NULL_TIMER):
        return srdrl_loss(self.policy, self.heads, batch, objective, rewards, generator,
                          samples=samples, timer=timer)


class VLMCollate:
    """collate plus the policy's VLM inputs (image preprocessing, tokens), so that the
    DataLoader's worker processes do that CPU work while the GPU runs the previous step."""

    def __init__(self, builder):
        self.builder = builder

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(samples)
        batch[VLM_INPUTS_KEY] = self.builder(batch)
        return batch


class ResumableSampler(Sampler):
    """A DistributedSampler's epoch order, started after the batches already consumed."""

    def __init__(self, sampler: DistributedSampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return iter(list(self.sampler)[self.skip:])

    def __len__(self):
        return max(len(self.sampler) - self.skip, 0)


def sample_gathered(engine, batch, objective: ObjectiveConfig, noise) -> tuple:
    """ZeRO-3: gather the policy's parameters, encode the prefix and sample eagerly."""
    import deepspeed

    policy = engine.module.policy
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(policy.parameters())):
        return sample_trajectories(policy, batch, objective.num_trajectory_samples,
                                   steps=objective.flow_steps,
                                   noise_scale_step=objective.noise_scale_step,
                                   generator=noise, use_cuda_graph=False)


def warmup_cosine(warmup: int, total: int, floor: float = 0.1):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# --------------------------------------------------------------------------- state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, out: Path, progress: dict, rank: int) -> None:
    """DeepSpeed's own save. Each rank's RNG goes into the tag folder first; DeepSpeed
    writes ``latest`` last, so a checkpoint that ``latest`` names is complete. (The
    training noise itself is keyed by scene and epoch, see ``srdrl.policy.noise``.)"""
    tag = f"step{progress['global_step']}"
    folder = out / CHECKPOINTS / tag
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"rng_rank{rank}.pt.tmp"
    torch.save(rng_state(), tmp)
    os.replace(tmp, folder / f"rng_rank{rank}.pt")
    torch.distributed.barrier()
    engine.save_checkpoint(str(out / CHECKPOINTS), tag=tag, client_state=progress)


def load_checkpoint(engine, out: Path, rank: int) -> dict | None:
    if not (out / CHECKPOINTS / "latest").is_file():
        return None
    tag = (out / CHECKPOINTS / "latest").read_text().strip()
    path, progress = engine.load_checkpoint(str(out / CHECKPOINTS), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {tag} from {out / CHECKPOINTS}")
    set_rng_state(torch.load(out / CHECKPOINTS / tag / f"rng_rank{rank}.pt", weights_only=False))
    return progress


def export_policy(engine, out: Path, rank: int, zero_stage: int) -> Path:
    """The trained policy as safetensors (save_pretrained), gathered under ZeRO-3."""
    import deepspeed

    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
              if zero_stage == 3 else contextlib.nullcontext())
    with gather:
        if rank == 0:
            policy = engine.module.policy
            dtype = next(policy.parameters()).dtype
            policy.float().save_pretrained(out / EXPORT)
            policy.to(dtype)
    torch.distributed.barrier()
    return out / EXPORT


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, objective: ObjectiveConfig, rewards: RewardConfig) -> dict:
    import deepspeed

    rank, world, device = init_distributed()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds_config = resolve_deepspeed_config(cfg, world)
    zero_stage = ds_config["zero_optimization"].get("stage", 0)
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
    module = SRDRLModule(policy)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(cfg.warmup_steps, total_steps)),
    )
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)

    gather_to_sample = zero_stage == 3 and objective.rl_loss_weight > 0
    if rank == 0 and gather_to_sample:
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
            samples = sample_gathered(engine, batch, objective, noise) if gather_to_sample \
                else None
            loss, metrics = engine(batch, objective, rewards, noise, samples)
            engine.backward(loss)
            engine.step()
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
