"""The metrics of srdrl-eval: per scene, per reasoning mode and seed, over seeds, and the
printed summary (docs/DESIGN.md, "Evaluation"). ``srdrl.evaluate`` runs the policy and
calls these."""

from __future__ import annotations

import numpy as np
import torch

from srdrl.footprint import VEHICLE_HALF_WIDTH, footprint_crosses
from srdrl.gate_diagnostics import format_number, mean_or_none
from srdrl.policy import VLAPolicy
from srdrl.reasoning_facts import accuracy, scene_truth, stated_facts
from srdrl.rewards import Intent, motion_alignment, parse_intent
from srdrl.timegrid import DT

MODE_NOTES = {
    "generated": "the policy generates its reasoning from prompt and images, the expert "
                 "reads it: inference as deployed (headline)",
    "oracle": "DIAGNOSTIC: the dataset's reasoning is teacher-forced; the synthetic text "
              "states the answer, so this measures instruction following, not driving",
    "none": "no reasoning in the prefix: prompt and images only",
}
SPREAD_KEYS = ("hazard_crossing_rate", "hazard_crossing_rate_in_path_scenes", "ade", "fde",
               "min_ade", "truth_intent_alignment_rate")
"""Metrics whose spread over the evaluation seeds the report gives."""
_TRUTH_INTENTS = {"left": Intent("left", None), "right": Intent("right", None),
                  "straight": Intent("straight", None), "stop": Intent(None, "stop")}


# --------------------------------------------------------------------------- policy metrics


def crosses_any_hazard(trajectory: np.ndarray, hazards: list[dict]) -> bool:
    """Whether the path enters a hazard. A path with a NaN or infinite coordinate counts as
    crossing: a policy that outputs no usable path has failed, whatever the scene holds
    (the footprint test alone would find no point inside anything and call it safe)."""
    if not np.isfinite(trajectory[..., :2]).all():
        return True
    return any(footprint_crosses(trajectory, np.asarray(h["footprint"])) for h in hazards)


def comfort(policy: VLAPolicy, actions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Peak |acceleration| (m/s^2), peak |jerk| (m/s^3) per candidate, and in-bounds mask."""
    physical = policy.action_space.denormalize(actions.double())  # (..., T, 2)
    accel = physical[..., 0]
    jerk = accel.diff(dim=-1) / DT
    return {"peak_accel": accel.abs().amax(-1), "peak_jerk": jerk.abs().amax(-1),
            "in_bounds": policy.action_space.in_bounds(actions)}


def scene_rows(policy: VLAPolicy, batch: dict, actions: torch.Tensor, trajs: torch.Tensor,
               texts: list[str], neutral: float) -> list[dict]:
    """One dict of metrics per scene for K sampled trajectories (B, K, T, 3) and the
    reasoning ``texts`` the expert read."""
    trajs, actions = trajs.cpu().double(), actions.cpu()
    pred = trajs[:, 0]  # (B, T, 3)
    label = batch["trajectory"].double()  # (B, T, 3)
    history = batch["ego_history_xyz"].double()
    clean = torch.tensor(np.array([e["clean_trajectory"] for e in batch["eval"]]))
    dist = (trajs[..., :2] - clean[:, None, :, :2]).norm(dim=-1)  # (B, K, T)
    intents = [parse_intent(t) for t in texts]
    aligned = motion_alignment(pred[:, None], history, intents, neutral)[:, 0] > 0.5
    truth = [_TRUTH_INTENTS.get(e.get("intent"), Intent(None, None)) for e in batch["eval"]]
    truth_aligned = motion_alignment(pred[:, None], history, truth, neutral)[:, 0] > 0.5
    c = comfort(policy, actions[:, 0])
    rows = []
    for b, ev in enumerate(batch["eval"]):
        hazards = ev.get("hazards", [])
        facts = stated_facts(texts[b])
        rows.append({
            "index": batch["index"][b], "sample_id": batch["sample_id"][b],
            "label_noisy": ev.get("label_noisy"), "reasoning": texts[b],
            "stated": facts, "truth": scene_truth(ev, history[b].numpy()),
            "ade": dist[b, 0].mean().item(), "fde": dist[b, 0, -1].item(),
            "min_ade": dist[b].mean(-1).min().item(),
            "ade_to_label": (pred[b, :, :2] - label[b, :, :2]).norm(dim=-1).mean().item(),
            "crosses": crosses_any_hazard(pred[b].numpy(), hazards),
            "label_crosses": crosses_any_hazard(label[b].numpy(), hazards),
            "in_path": any(h["in_path"] for h in hazards),
            "non_finite": not bool(torch.isfinite(pred[b]).all()),
            "aligned": bool(aligned[b]) if intents[b].stated else None,
            "truth_aligned": bool(truth_aligned[b]) if truth[b].stated else None,
            "peak_accel": c["peak_accel"][b].item(), "peak_jerk": c["peak_jerk"][b].item(),
            "in_bounds": c["in_bounds"][b].float().mean().item(),
            "predictions": trajs[b].float().numpy(),
        })
    return rows


def summarise(rows: list[dict], num_samples: int) -> dict:
    """The metrics of one mode, frame variant and seed over all scenes."""
    def col(key, where=None):
        return np.array([r[key] for r in rows if where is None or where(r)], dtype=np.float64)

    in_path = col("in_path") == 1
    summary = {
        "scenes": len(rows),
        "num_samples": num_samples,
        "vehicle_half_width_m": VEHICLE_HALF_WIDTH,
        "hazard_crossing_rate": float(col("crosses").mean()),
        "non_finite_predictions": int(col("non_finite").sum()),
        "hazard_crossing_rate_in_path_scenes": mean_or_none(col("crosses")[in_path]),
        "label_hazard_crossing_rate": float(col("label_crosses").mean()),
        "ade": float(col("ade").mean()),
        "fde": float(col("fde").mean()),
        "ade_hazard_free": mean_or_none(col("ade")[~in_path]),
        "fde_hazard_free": mean_or_none(col("fde")[~in_path]),
        "min_ade": float(col("min_ade").mean()),
        "reasoning_alignment_rate": mean_or_none(col("aligned", lambda r: r["aligned"]
                                                     is not None)),
        "truth_intent_alignment_rate": mean_or_none(col("truth_aligned", lambda r:
                                                        r["truth_aligned"] is not None)),
        "peak_accel_mean": float(col("peak_accel").mean()),
        "peak_jerk_mean": float(col("peak_jerk").mean()),
        "actions_in_bounds": float(col("in_bounds").mean()),
    }
    summary.update({f"reasoning_{k}": v for k, v in accuracy(
        [r["stated"] for r in rows], [r["truth"] for r in rows]).items()})
    if all(r["label_noisy"] is not None for r in rows):
        noisy = col("label_noisy") == 1
        summary["noisy_label_scenes"] = int(noisy.sum())
        summary["ade_noisy_label_scenes"] = mean_or_none(col("ade")[noisy])
        # the prediction "left the label behind": nearer the clean path than the wrong label
        summary["noisy_label_left_behind_rate"] = mean_or_none(
            (col("ade") < col("ade_to_label"))[noisy].astype(np.float64))
    return summary


def over_seeds(per_seed: list[dict], seeds: list[int]) -> dict:
    """Mean of each metric over the seeds (None where a seed has none), the spread of the
    ``SPREAD_KEYS`` (population std, min, max) and every seed's own values."""
    out = {}
    for key, first in per_seed[0].items():
        values = [s[key] for s in per_seed]
        if isinstance(first, int) or any(v is None for v in values):
            out[key] = first if all(v == first for v in values) else values
        else:
            out[key] = float(np.mean(values))
    out["seed_spread"] = {
        key: {"std": float(np.std(v)), "min": float(np.min(v)), "max": float(np.max(v))}
        for key in SPREAD_KEYS
        if len(v := [s[key] for s in per_seed if s.get(key) is not None]) == len(per_seed)
    }
    out["per_seed"] = [{"seed": seed, **s} for seed, s in zip(seeds, per_seed, strict=True)]
    return out


# --------------------------------------------------------------------------- summary

_ROWS = (  # (label, key) of the printed table
    ("hazard crossing rate", "hazard_crossing_rate"),
    ("  in-the-way scenes", "hazard_crossing_rate_in_path_scenes"),
    ("ADE to clean, m", "ade"),
    ("FDE to clean, m", "fde"),
    ("ADE hazard-free, m", "ade_hazard_free"),
    ("min-ADE over samples, m", "min_ade"),
    ("noisy labels left behind", "noisy_label_left_behind_rate"),
    ("follows own reasoning", "reasoning_alignment_rate"),
    ("true manoeuvre driven", "truth_intent_alignment_rate"),
    ("text: hazard kind right", "reasoning_hazard_kind_accuracy"),
    ("text: hazard side right", "reasoning_hazard_side_accuracy"),
    ("text: manoeuvre right", "reasoning_manoeuvre_accuracy"),
    ("actions in bounds", "actions_in_bounds"),
)


def _cell(summary: dict, key: str) -> str:
    value = summary.get(key)
    if isinstance(value, list):
        value = None
    spread = summary.get("seed_spread", {}).get(key)
    text = format_number(value)
    if spread is not None and len(summary.get("per_seed", [])) > 1:
        text += f" ±{spread['std']:.3f}"
    return text


def _table(columns: dict[str, dict]) -> list[str]:
    lines = ["  " + " " * 26 + "".join(f"{name:>18}" for name in columns)]
    for label, key in _ROWS:
        cells = [_cell(s, key) for s in columns.values()]
        if any(c != "n/a" for c in cells):
            lines.append(f"  {label:26s}" + "".join(f"{c:>18}" for c in cells))
    return lines


def print_summary(report: dict) -> None:
    seeds = report["seeds"]
    spread = " (mean ±std over seeds)" if len(seeds) > 1 else ""
    print(f"evaluation on {report['scenes']} validation scenes, {report['num_samples']} "
          f"samples each, noise seed{'s' if len(seeds) > 1 else ''} "
          f"{' '.join(map(str, seeds))}{spread}; columns are reasoning modes:")
    modes = report["modes"]
    for line in _table({("oracle*" if m == "oracle" else m): s for m, s in modes.items()}):
        print(line)
    for m, s in modes.items():
        if s["non_finite_predictions"]:
            print(f"  NON-FINITE predictions ({m}) {s['non_finite_predictions']} (counted as "
                  "crossing)")
    if "oracle" in modes:
        print("  * oracle: " + MODE_NOTES["oracle"])
    ablation = report.get("image_ablation")
    if ablation:
        head = report["headline_mode"]
        print(f"image ablation ({head} reasoning): camera frames vs "
              + ", ".join(f"{v}: {ablation['frames'][v]}" for v in ablation["frames"]
                          if v != "camera"))
        columns = {"camera": modes[head], **{v: ablation[v][head] for v in ablation
                                             if v != "frames"}}
        for line in _table(columns):
            print(line)
