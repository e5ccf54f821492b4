"""Metrics of a trained policy on held-out scenes (evaluation-only fields of the data).

The prediction of a scene is its first sample (noise scale 1); min-ADE takes the best of
the K samples. Scenes need ``clean_trajectory`` and ``hazards`` for the safety and
accuracy metrics; the labels' own figures are reported beside the policy's for reference.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from srdrl.config import RewardConfig
from srdrl.data.dataset import JsonlDataset, collate
from srdrl.data.scenes import footprint_crosses
from srdrl.policy import VLAPolicy, sample_trajectories
from srdrl.rewards import motion_alignment, parse_intent

DT = 0.1


def crosses_any_hazard(trajectory: np.ndarray, hazards: list[dict]) -> bool:
    return any(footprint_crosses(trajectory, np.asarray(h["footprint"])) for h in hazards)


def comfort(policy: VLAPolicy, actions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Peak |acceleration| (m/s^2), peak |jerk| (m/s^3) per candidate, and in-bounds mask."""
    physical = policy.action_space.denormalize(actions.double())  # (..., T, 2)
    accel = physical[..., 0]
    jerk = accel.diff(dim=-1) / DT
    return {"peak_accel": accel.abs().amax(-1), "peak_jerk": jerk.abs().amax(-1),
            "in_bounds": policy.action_space.in_bounds(actions)}


@torch.no_grad()
def evaluate_policy(
    policy: VLAPolicy,
    dataset: JsonlDataset,
    num_samples: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    rewards: RewardConfig | None = None,
) -> dict:
    """Sample ``num_samples`` trajectories per scene and compare them with the clean ones."""
    if "clean_trajectory" not in dataset.records[0]["eval"]:
        raise ValueError(f"{dataset.path} has no evaluation fields (clean_trajectory, hazards)")
    neutral = (rewards or RewardConfig()).neutral_alignment
    was_training = policy.training
    policy.eval()
    generator = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {k: [] for k in (
        "crosses", "label_crosses", "in_path", "ade", "fde", "min_ade", "aligned",
        "stated", "peak_accel", "peak_jerk", "in_bounds")}
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    for batch in loader:
        actions, trajs = sample_trajectories(policy, batch, num_samples, generator=generator)
        trajs, actions = trajs.cpu().double(), actions.cpu()
        pred = trajs[:, 0]  # (B, T, 3)
        clean = torch.tensor(np.array([e["clean_trajectory"] for e in batch["eval"]]))
        dist = (trajs[..., :2] - clean[:, None, :, :2]).norm(dim=-1)  # (B, K, T)
        rows["ade"] += dist[:, 0].mean(-1).tolist()
        rows["fde"] += dist[:, 0, -1].tolist()
        rows["min_ade"] += dist.mean(-1).min(-1).values.tolist()
        intents = [parse_intent(t) for t in batch["reasoning_text"]]
        align = motion_alignment(pred[:, None], batch["ego_history_xyz"].double(), intents,
                                 neutral)[:, 0]
        rows["aligned"] += (align > 0.5).tolist()
        rows["stated"] += [i.stated for i in intents]
        c = comfort(policy, actions[:, 0])
        rows["peak_accel"] += c["peak_accel"].tolist()
        rows["peak_jerk"] += c["peak_jerk"].tolist()
        rows["in_bounds"] += c["in_bounds"].float().mean((-2, -1)).tolist()
        for b, ev in enumerate(batch["eval"]):
            hazards = ev.get("hazards", [])
            rows["crosses"].append(crosses_any_hazard(pred[b].numpy(), hazards))
            rows["label_crosses"].append(
                crosses_any_hazard(batch["trajectory"][b].double().numpy(), hazards))
            rows["in_path"].append(any(h["in_path"] for h in hazards))
    policy.train(was_training)

    r = {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}
    free = r["in_path"] == 0
    stated = r["stated"] == 1
    return {
        "scenes": int(len(r["ade"])),
        "num_samples": num_samples,
        "hazard_crossing_rate": float(r["crosses"].mean()),
        "hazard_crossing_rate_in_path_scenes": _mean(r["crosses"][~free]),
        "label_hazard_crossing_rate": float(r["label_crosses"].mean()),
        "ade": float(r["ade"].mean()),
        "fde": float(r["fde"].mean()),
        "ade_hazard_free": _mean(r["ade"][free]),
        "fde_hazard_free": _mean(r["fde"][free]),
        "min_ade": float(r["min_ade"].mean()),
        "reasoning_alignment_rate": _mean(r["aligned"][stated]),
        "peak_accel_mean": float(r["peak_accel"].mean()),
        "peak_jerk_mean": float(r["peak_jerk"].mean()),
        "actions_in_bounds": float(r["in_bounds"].mean()),
    }


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if len(x) else None


def print_summary(report: dict) -> None:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    print(f"evaluation on {report['scenes']} validation scenes, {report['num_samples']} "
          "samples each:")
    print(f"  hazard crossing rate   {fmt(report['hazard_crossing_rate'])} "
          f"(labels: {fmt(report['label_hazard_crossing_rate'])}; scenes with a hazard in "
          f"the way: {fmt(report['hazard_crossing_rate_in_path_scenes'])})")
    print(f"  ADE / FDE to clean     {fmt(report['ade'])} / {fmt(report['fde'])} m "
          f"(hazard-free scenes: {fmt(report['ade_hazard_free'])} / "
          f"{fmt(report['fde_hazard_free'])} m; min-ADE over samples {fmt(report['min_ade'])})")
    print(f"  reasoning alignment    {fmt(report['reasoning_alignment_rate'])}")
    print(f"  comfort                peak |a| {fmt(report['peak_accel_mean'])} m/s^2, "
          f"peak |jerk| {fmt(report['peak_jerk_mean'])} m/s^3, actions in bounds "
          f"{fmt(report['actions_in_bounds'])}")
