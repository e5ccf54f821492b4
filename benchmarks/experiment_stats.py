"""Statistics of the noisy-label experiment (docs/EXPERIMENTS.md): paired bootstrap of a
crossing-rate ratio over matched test scenes and seeds, and what a training log says about
the gate and the label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def paired_bootstrap_ratio(arm: np.ndarray, ref: np.ndarray, resamples: int = 4000,
                           level: float = 0.95, seed: int = 0) -> dict:
    """Ratio sum(arm) / sum(ref) of two paired (R, S) arrays, R paired runs (same base seed
    and evaluation seed in both) by S matched scenes, and its percentile confidence interval
    from a two-level bootstrap: runs and scenes are each drawn with replacement, the same
    draw for both arms. Resamples whose ref sum is 0 count as an infinite ratio."""
    arm, ref = np.asarray(arm, np.float64), np.asarray(ref, np.float64)
    if arm.shape != ref.shape or arm.ndim != 2 or arm.size == 0:
        raise ValueError(f"need two (runs, scenes) arrays of one shape, got {arm.shape}, "
                         f"{ref.shape}")
    runs, scenes = arm.shape
    rng = np.random.default_rng(seed)
    w_run = rng.multinomial(runs, np.full(runs, 1.0 / runs), size=resamples)  # (B, R)
    w_scene = rng.multinomial(scenes, np.full(scenes, 1.0 / scenes), size=resamples)
    num = np.einsum("br,rs,bs->b", w_run, arm, w_scene)
    den = np.einsum("br,rs,bs->b", w_run, ref, w_scene)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.inf)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(ratios, [tail, 1.0 - tail], method="inverted_cdf")
    total = ref.sum()
    return {"ratio": float(arm.sum() / total) if total > 0 else None,
            "ci_low": float(lo), "ci_high": float(hi), "level": level,
            "resamples": resamples, "runs": runs, "scenes": scenes}


def training_summary(metrics_path: Path) -> dict:
    """From a run's metrics.jsonl (rows averaged over equal windows): gt_is_best and
    label_beaten over the whole run (and its last fifth), and the gate's precision and
    recall against the logged label_noisy flags (a diagnostic: the loss never reads them)."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()
            if line.strip()]
    rows = [r for r in rows if r.get("gt_is_best") is not None]
    if not rows:
        return {}

    def mean(key, part=rows):
        vals = [r[key] for r in part if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    tail = rows[-max(1, len(rows) // 5):]
    out = {"gt_is_best": mean("gt_is_best"), "gt_is_best_last_fifth": mean("gt_is_best", tail),
           "label_beaten": mean("label_beaten"), "gate_fired": mean("gate_fired")}
    fired, hit, noisy = (mean(k) for k in ("gate_fired", "gate_fired_noisy", "label_noisy"))
    if hit is not None:
        out["gate_precision"] = hit / fired if fired else None
        out["gate_recall"] = hit / noisy if noisy else None
    return out
