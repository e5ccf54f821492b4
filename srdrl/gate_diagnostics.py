"""How well the trust gate finds wrong labels, measured on training data (no policy).

Each training label is scored alone with the rewards (``score_candidates`` with candidates
= the label) and the gate's verdict is compared with the data's ``label_noisy`` field. The
gate fires on danger confidence >= danger_threshold and label safety < unsafe_threshold;
besides precision and recall the report gives how the label's visual safety is distributed
for noisy and clean labels, the AUROC of (1 - safety), and the unsafe threshold that would
maximise F1 on this data (an in-sample diagnostic of where the distributions separate, not
a tuned setting).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from srdrl.config import RewardConfig
from srdrl.data.dataset import DataError, JsonlDataset, collate, scored_images
from srdrl.rewards import RewardTerms, score_candidates


def mean_or_none(x: np.ndarray) -> float | None:
    return float(x.mean()) if len(x) else None


def format_number(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


@dataclass
class LabelScores:
    """Per training scene: the label's visual safety, the reasoning's danger confidence,
    whether the gate fired, and whether the label is noisy (the data's ``label_noisy``)."""

    safety: np.ndarray  # (S,) float64
    danger: np.ndarray  # (S,) float64
    fired: np.ndarray  # (S,) bool
    noisy: np.ndarray  # (S,) bool


@torch.no_grad()
def score_labels(
    dataset: JsonlDataset, reward_cfg: RewardConfig | None = None, batch_size: int = 16,
    progress: bool = False, scorer: Callable[..., RewardTerms] = score_candidates,
) -> LabelScores:
    """Score every label alone (candidates = label[:, None]) as the trainer scores GT.

    ``scorer`` has the signature of :func:`srdrl.rewards.score_candidates` (the default);
    tests pass one with known safety values."""
    cfg = reward_cfg or RewardConfig()
    missing = [r["sample_id"] for r in dataset.records if "label_noisy" not in r["eval"]]
    if missing:
        raise DataError(f"{dataset.path}: {len(missing)} scenes lack the evaluation field "
                        f"'label_noisy' (first: {missing[0]}); the gate diagnostics need it")
    out: dict[str, list] = {"safety": [], "danger": [], "fired": [], "noisy": []}
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton (auto) needs CUDA
    for batch in tqdm(loader, desc="gate", unit="batch", disable=not progress, leave=False):
        t = {k: batch[k].to(device) for k in ("trajectory", "ego_history_xyz", "K",
                                               "T_cam_from_ego")}
        label = t["trajectory"]  # (B, T, 3)
        terms = scorer(scored_images(batch).to(device), label[:, None], label,
                                 t["ego_history_xyz"], t["K"], t["T_cam_from_ego"],
                                 batch["reasoning_text"], cfg)
        out["safety"] += terms.safety[:, 0].tolist()
        out["danger"] += terms.danger.tolist()
        out["fired"] += terms.gate_fired.tolist()
        out["noisy"] += [bool(e["label_noisy"]) for e in batch["eval"]]
    return LabelScores(np.asarray(out["safety"], np.float64), np.asarray(out["danger"],
                       np.float64), np.asarray(out["fired"], bool), np.asarray(out["noisy"], bool))


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positive`` (Mann-Whitney, ties count
    half); None when one class is empty."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based, averaged over ties
    ranks = mean_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _detection(flagged: np.ndarray, noisy: np.ndarray) -> dict:
    """Precision, recall, F1 of ``flagged`` as a detector of noisy labels (columns of a
    (S, M) matrix, or one (S,) vector), and its firing rates on noisy and clean labels."""
    tp = (flagged & noisy[:, None] if flagged.ndim == 2 else flagged & noisy).sum(0)
    fp = (flagged & ~noisy[:, None] if flagged.ndim == 2 else flagged & ~noisy).sum(0)
    n_pos, n_neg = noisy.sum(), (~noisy).sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.nan)
        recall = np.where(n_pos > 0, tp / max(n_pos, 1), np.nan)
        f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + (n_pos - tp), 1), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1,
            "fire_rate_noisy": tp / n_pos if n_pos else np.full_like(tp, np.nan, float),
            "fire_rate_clean": fp / n_neg if n_neg else np.full_like(fp, np.nan, float)}


def _number(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def _distribution(x: np.ndarray) -> dict | None:
    if not len(x):
        return None
    q = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"count": int(len(x)), "mean": float(x.mean()), "min": float(q[0]),
            "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "max": float(q[4])}


def gate_statistics(scores: LabelScores, reward_cfg: RewardConfig | None = None) -> dict:
    """Precision/recall of the gate as a noisy-label detector, the label-safety
    distributions, AUROC, and the unsafe threshold that would maximise F1 (diagnostic)."""
    cfg = reward_cfg or RewardConfig()
    s, noisy = scores.safety, scores.noisy
    named = scores.danger >= cfg.danger_threshold
    at_setting = {k: _number(v) for k, v in _detection(scores.fired, noisy).items()}

    # Sweep the unsafe threshold: midpoints between distinct safety values and both ends.
    values = np.unique(s)
    thresholds = np.concatenate([[values[0] - 1e-6], (values[1:] + values[:-1]) / 2,
                                 [values[-1] + 1e-6]]) if len(values) else np.zeros(0)
    sweep = _detection(named[:, None] & (s[:, None] < thresholds[None, :]), noisy)
    best = int(np.argmax(sweep["f1"])) if len(thresholds) else None
    return {
        "scenes": int(len(s)),
        "noisy_labels": int(noisy.sum()),
        "clean_labels": int((~noisy).sum()),
        "danger_threshold": cfg.danger_threshold,
        "unsafe_threshold": cfg.unsafe_threshold,
        "use_trust_gate": cfg.use_trust_gate,
        **at_setting,
        "danger_named_rate_noisy": mean_or_none(named[noisy].astype(np.float64)),
        "danger_named_rate_clean": mean_or_none(named[~noisy].astype(np.float64)),
        "label_safety_noisy": _distribution(s[noisy]),
        "label_safety_clean": _distribution(s[~noisy]),
        "auroc_one_minus_safety": auroc(1 - s, noisy),
        "auroc_one_minus_safety_danger_named": auroc(1 - s[named], noisy[named]),
        "diagnostic_best_f1_unsafe_threshold": None if best is None else {
            "note": "in-sample diagnostic: the unsafe_threshold that would maximise the "
                    "gate's F1 on THIS data (danger rule unchanged); not a tuned setting",
            "unsafe_threshold": float(thresholds[best]),
            **{k: _number(v[best]) for k, v in sweep.items()},
        },
    }


def gate_diagnostics(
    dataset: JsonlDataset, reward_cfg: RewardConfig | None = None, batch_size: int = 16,
    progress: bool = False, scorer: Callable[..., RewardTerms] = score_candidates,
) -> dict:
    """Score each training label alone and compare the trust gate with ``label_noisy``."""
    return gate_statistics(score_labels(dataset, reward_cfg, batch_size, progress, scorer),
                           reward_cfg)


def print_gate_summary(gate: dict) -> None:
    fmt = format_number
    print(f"trust gate on {gate['scenes']} training labels ({gate['noisy_labels']} noisy), "
          f"danger >= {gate['danger_threshold']:g} and label safety < "
          f"{gate['unsafe_threshold']:g}:")
    print(f"  fires on noisy / clean {fmt(gate['fire_rate_noisy'])} / "
          f"{fmt(gate['fire_rate_clean'])}; precision {fmt(gate['precision'])}, recall "
          f"{fmt(gate['recall'])}, F1 {fmt(gate['f1'])}")
    for kind in ("noisy", "clean"):
        d = gate[f"label_safety_{kind}"]
        if d is not None:
            print(f"  label safety, {kind:5s}   mean {d['mean']:.3f}, quartiles {d['q25']:.3f} "
                  f"/ {d['median']:.3f} / {d['q75']:.3f} (n={d['count']})")
    print(f"  AUROC of 1 - safety    {fmt(gate['auroc_one_minus_safety'])} (among scenes "
          f"naming a danger: {fmt(gate['auroc_one_minus_safety_danger_named'])})")
    best = gate["diagnostic_best_f1_unsafe_threshold"]
    if best is not None:
        print(f"  [diagnostic, in-sample] unsafe_threshold {best['unsafe_threshold']:.3f} "
              f"would give F1 {fmt(best['f1'])} (precision {fmt(best['precision'])}, recall "
              f"{fmt(best['recall'])})")
