"""The training metrics: averaged per logging window, written by rank 0 as strict JSON lines
(``metrics.jsonl``) and TensorBoard scalars, and resumable to the row.

Each micro-step's metrics (floats) are kept until the window's optimiser step is logged;
a row is the mean over the window's micro-steps and over ranks. The pending micro-steps
are part of the checkpoint (``state()``/``load_state()``), and a resumed run first drops
the rows written after its checkpoint, so ``metrics.jsonl`` after a resume is the file an
unbroken run writes (timings aside). Non-finite values are written as ``null`` (strict
JSON has no NaN or Infinity) and named under ``"non_finite"``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"
LOG_ORDER = ("loss", "language_loss", "traj_loss", "awr_loss", "consistency_loss",
             "reward_mean", "reward_best", "gt_is_best", "safety", "gt_sim", "reasoning",
             "gate_fired", "awr_weight_mean")


def strict_row(metrics: dict) -> dict:
    """``metrics`` with non-finite floats replaced by None and listed under non_finite."""
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    row = {k: (None if k in bad else v) for k, v in metrics.items()}
    if bad:
        row["non_finite"] = bad
    return row


def truncate_after(path: Path, step: int) -> None:
    """Keep only the rows of ``path`` up to ``step`` (atomically)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class MetricsLog:
    """Accumulates micro-step metrics and logs one row per logging step."""

    def __init__(self, out: Path, rank: int, world: int, resumed_step: int = 0):
        self.rank, self.world = rank, world
        self.pending: list[dict[str, float]] = []
        self.writer = self.file = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            truncate_after(out / METRICS_FILE, resumed_step)
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resumed_step + 1)
            self.file = open(out / METRICS_FILE, "a")

    def add(self, metrics: dict[str, float]) -> None:
        self.pending.append(dict(metrics))

    # -------------------------------------------------------------- checkpoint state
    def state(self) -> list[list[dict]]:
        """Every rank's pending micro-steps (collective: call on all ranks)."""
        gathered = [None] * self.world
        torch.distributed.all_gather_object(gathered, self.pending)
        return gathered

    def load_state(self, state: list[list[dict]] | None) -> None:
        self.pending = list(state[self.rank]) if state else []

    # -------------------------------------------------------------- logging
    def log(self, step: int, dt: float, scenes_per_step: int, lr: float, bar=None) -> dict:
        """Mean of the pending micro-steps over micro-steps and ranks (collective); rank 0
        writes the row. Returns the row."""
        keys = sorted({k for m in self.pending for k in m})
        sums = []
        for k in keys:
            total = 0.0
            for m in self.pending:  # in micro-step order, as an unbroken run adds them
                total += m.get(k, 0.0)
            sums.append(total / max(len(self.pending), 1))
        device = (torch.device("cuda", torch.cuda.current_device())
                  if torch.cuda.is_available() else torch.device("cpu"))  # NCCL: device only
        values = torch.tensor(sums, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(values)
        values /= self.world
        metrics = dict(zip(keys, values.cpu().tolist(), strict=True))
        metrics.update(step=step, lr=lr, step_time_s=dt,
                       scenes_per_s=scenes_per_step / max(dt, 1e-9))
        self.pending = []
        if self.rank == 0:
            line = " ".join(f"{k}={metrics[k]:.4g}" for k in LOG_ORDER if k in metrics)
            message = (f"step {step} {line} lr={lr:.3g} dt={dt:.2f}s "
                       f"scenes/s={metrics['scenes_per_s']:.1f}")
            (bar.write if bar is not None else print)(message)
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            self.file.write(json.dumps(strict_row(metrics), allow_nan=False) + "\n")
            self.file.flush()
        return metrics

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.writer.close()
