"""Evaluation: a trained policy on held-out scenes, and the trust gate on training labels.

``evaluate_policy`` samples K trajectories per validation scene; the first (noise scale 1)
is the prediction, min-ADE takes the best of the K. It needs the evaluation-only fields
``clean_trajectory`` and ``hazards``: hazard crossing uses the vehicle footprint
(half-width ``VEHICLE_HALF_WIDTH`` = 0.9 m), ADE/FDE compare with the clean trajectory.

The CLI also reports how well the trust gate finds the wrong labels of the training data
(``srdrl.gate_diagnostics``, no policy needed).

    srdrl-eval --policy runs/x/policy --data_path data/val.jsonl
    srdrl-eval --policy runs/x/policy --data_path data/val.jsonl --num_samples 8 \\
        --output_dir runs/x/eval --pictures 6 --scoring_backend kornia
    srdrl-eval --config eval.yaml --seed 1        # values from a file, flags override

writes OUTPUT_DIR/eval_report.json (default OUTPUT_DIR = POLICY/eval),
OUTPUT_DIR/eval_scenes.jsonl (one row per validation scene) and PNGs under
OUTPUT_DIR/pictures: camera frames with the paths drawn on, a bird's-eye view per chosen
scene, the label-safety histogram of the gate diagnostics and the training curves of
POLICY/../metrics.jsonl (the last three need matplotlib, the ``plot`` extra). Every flag,
the trust gate's thresholds among them, is listed by ``srdrl-eval --help``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from srdrl.cli import parse_config
from srdrl.config import EvalConfig, RewardConfig
from srdrl.data.dataset import DataError, JsonlDataset, collate
from srdrl.footprint import VEHICLE_HALF_WIDTH, footprint_crosses
from srdrl.gate_diagnostics import (  # noqa: F401 (re-exported: the CLI reports them)
    LabelScores,
    auroc,
    format_number,
    gate_diagnostics,
    gate_statistics,
    mean_or_none,
    print_gate_summary,
    score_labels,
)
from srdrl.policy import VLAPolicy, sample_trajectories
from srdrl.policy.formats import CheckpointError, detect_layout
from srdrl.rewards import motion_alignment, parse_intent
from srdrl.timegrid import DT

REPORT_FILE = "eval_report.json"
SCENES_FILE = "eval_scenes.jsonl"


# --------------------------------------------------------------------------- policy metrics


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
def evaluate_scenes(
    policy: VLAPolicy,
    dataset: JsonlDataset,
    num_samples: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    rewards: RewardConfig | None = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """The report of :func:`evaluate_policy` and one row per scene (its K sampled
    trajectories under ``predictions``, (K, T, 3) float32, the first being the prediction)."""
    if "clean_trajectory" not in dataset.records[0]["eval"]:
        raise DataError(f"{dataset.path} has no evaluation fields (clean_trajectory, hazards)")
    neutral = (rewards or RewardConfig()).neutral_alignment
    was_training = policy.training
    policy.eval()
    generator = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {k: [] for k in (
        "crosses", "label_crosses", "in_path", "ade", "fde", "min_ade", "ade_to_label",
        "aligned", "stated", "peak_accel", "peak_jerk", "in_bounds")}
    scenes: list[dict] = []
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        actions, trajs = sample_trajectories(policy, batch, num_samples, generator=generator)
        trajs, actions = trajs.cpu().double(), actions.cpu()
        pred = trajs[:, 0]  # (B, T, 3)
        label = batch["trajectory"].double()  # (B, T, 3)
        clean = torch.tensor(np.array([e["clean_trajectory"] for e in batch["eval"]]))
        dist = (trajs[..., :2] - clean[:, None, :, :2]).norm(dim=-1)  # (B, K, T)
        rows["ade"] += dist[:, 0].mean(-1).tolist()
        rows["fde"] += dist[:, 0, -1].tolist()
        rows["min_ade"] += dist.mean(-1).min(-1).values.tolist()
        rows["ade_to_label"] += (pred[..., :2] - label[..., :2]).norm(dim=-1).mean(-1).tolist()
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
            rows["label_crosses"].append(crosses_any_hazard(label[b].numpy(), hazards))
            rows["in_path"].append(any(h["in_path"] for h in hazards))
            i = len(scenes)
            scenes.append({
                "index": batch["index"][b], "sample_id": batch["sample_id"][b],
                "label_noisy": ev.get("label_noisy"), "ade": rows["ade"][i],
                "fde": rows["fde"][i], "min_ade": rows["min_ade"][i],
                "ade_to_label": rows["ade_to_label"][i], "crosses": rows["crosses"][i],
                "label_crosses": rows["label_crosses"][i],
                "predictions": trajs[b].float().numpy(),
            })
    policy.train(was_training)

    r = {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}
    free = r["in_path"] == 0
    stated = r["stated"] == 1
    report = {
        "scenes": int(len(r["ade"])),
        "num_samples": num_samples,
        "vehicle_half_width_m": VEHICLE_HALF_WIDTH,
        "hazard_crossing_rate": float(r["crosses"].mean()),
        "hazard_crossing_rate_in_path_scenes": mean_or_none(r["crosses"][~free]),
        "label_hazard_crossing_rate": float(r["label_crosses"].mean()),
        "ade": float(r["ade"].mean()),
        "fde": float(r["fde"].mean()),
        "ade_hazard_free": mean_or_none(r["ade"][free]),
        "fde_hazard_free": mean_or_none(r["fde"][free]),
        "min_ade": float(r["min_ade"].mean()),
        "reasoning_alignment_rate": mean_or_none(r["aligned"][stated]),
        "peak_accel_mean": float(r["peak_accel"].mean()),
        "peak_jerk_mean": float(r["peak_jerk"].mean()),
        "actions_in_bounds": float(r["in_bounds"].mean()),
    }
    if all(s["label_noisy"] is not None for s in scenes):
        noisy = np.array([s["label_noisy"] for s in scenes], dtype=bool)
        report["noisy_label_scenes"] = int(noisy.sum())
        report["ade_noisy_label_scenes"] = mean_or_none(r["ade"][noisy])
        # the prediction "left the label behind": nearer the clean path than the wrong label
        report["noisy_label_left_behind_rate"] = mean_or_none(
            (r["ade"] < r["ade_to_label"])[noisy].astype(np.float64))
    return report, scenes


def evaluate_policy(
    policy: VLAPolicy,
    dataset: JsonlDataset,
    num_samples: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    rewards: RewardConfig | None = None,
    progress: bool = True,
) -> dict:
    """Sample ``num_samples`` trajectories per scene and compare them with the clean ones."""
    return evaluate_scenes(policy, dataset, num_samples, batch_size, seed, rewards,
                           progress)[0]


def print_summary(report: dict) -> None:
    fmt = format_number
    print(f"evaluation on {report['scenes']} validation scenes, {report['num_samples']} "
          "samples each:")
    print(f"  hazard crossing rate   {fmt(report['hazard_crossing_rate'])} "
          f"(labels: {fmt(report['label_hazard_crossing_rate'])}; scenes with a hazard in "
          f"the way: {fmt(report['hazard_crossing_rate_in_path_scenes'])})")
    print(f"  ADE / FDE to clean     {fmt(report['ade'])} / {fmt(report['fde'])} m "
          f"(hazard-free scenes: {fmt(report['ade_hazard_free'])} / "
          f"{fmt(report['fde_hazard_free'])} m; min-ADE over samples {fmt(report['min_ade'])})")
    if "noisy_label_scenes" in report:
        print(f"  noisy-label scenes     {report['noisy_label_scenes']}: ADE to clean "
              f"{fmt(report['ade_noisy_label_scenes'])} m, prediction nearer clean than "
              f"label in {fmt(report['noisy_label_left_behind_rate'])}")
    print(f"  reasoning alignment    {fmt(report['reasoning_alignment_rate'])}")
    print(f"  comfort                peak |a| {fmt(report['peak_accel_mean'])} m/s^2, "
          f"peak |jerk| {fmt(report['peak_jerk_mean'])} m/s^3, actions in bounds "
          f"{fmt(report['actions_in_bounds'])}")


# --------------------------------------------------------------------------- pictures


def choose_scenes(scenes: list[dict], count: int) -> list[dict]:
    """The most telling scenes first: noisy labels the prediction left behind (most first),
    then the other noisy labels, then predictions that cross a hazard, then the largest
    ADE to the clean path."""
    def key(s):
        if s["label_noisy"]:
            return (0, -(s["ade_to_label"] - s["ade"]))
        return (1, not s["crosses"], -s["ade"])

    return sorted(scenes, key=key)[:count]


def _scene_title(s: dict) -> str:
    noisy = "noisy label, " if s["label_noisy"] else ""
    crosses = ", crosses hazard" if s["crosses"] else ""
    return (f"{s['sample_id']}: {noisy}ADE clean {s['ade']:.1f} m / label "
            f"{s['ade_to_label']:.1f} m{crosses}")


def draw_pictures(dataset: JsonlDataset, scenes: list[dict], out: Path, count: int,
                  metrics: Path | None, gate_scores: LabelScores | None = None,
                  gate: dict | None = None) -> list[Path]:
    """Camera sheet and bird's-eye views of the chosen scenes, the gate's label-safety
    histogram and the training curves. Without matplotlib only the camera sheet is drawn."""
    from srdrl import visualize

    out.mkdir(parents=True, exist_ok=True)
    chosen = choose_scenes(scenes, count)
    written = []
    items = []
    for s in chosen:
        sample, rec = dataset[s["index"]], dataset.records[s["index"]]
        items.append({
            "image": sample["images"][-1].numpy(), "K": sample["K"].numpy(),
            "T_cam_from_ego": sample["T_cam_from_ego"].numpy(),
            "label": rec["trajectory"], "clean": np.asarray(rec["eval"]["clean_trajectory"]),
            "predictions": s["predictions"], "label_noisy": bool(s["label_noisy"]),
            "hazards": rec["eval"].get("hazards", []), "title": _scene_title(s),
            "sample_id": s["sample_id"],
        })
    if items:
        written.append(visualize.camera_sheet(items, out / "camera_frames.png"))
    try:
        visualize.pyplot()
    except ImportError as e:
        print(f"srdrl-eval: {e}; skipping the bird's-eye views and curves", file=sys.stderr)
        return written
    for i, item in enumerate(items):
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", item["sample_id"])
        written.append(visualize.plot_birds_eye(
            out / f"bev_{i:02d}_{name}.png", item["hazards"], item["label"], item["clean"],
            item["predictions"], VEHICLE_HALF_WIDTH, title=item["title"],
            label_noisy=item["label_noisy"]))
    if gate_scores is not None and gate is not None:
        best = gate["diagnostic_best_f1_unsafe_threshold"]
        written.append(visualize.plot_label_safety(
            out / "gate_label_safety.png", gate_scores.safety, gate_scores.noisy,
            gate["unsafe_threshold"], None if best is None else best["unsafe_threshold"]))
    if metrics is not None:
        written.append(visualize.plot_training_curves(metrics, out / "training_curves.png"))
    return written


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> tuple[EvalConfig, RewardConfig]:
    """(EvalConfig, RewardConfig) from a --config file and the command line."""
    return parse_config((EvalConfig, RewardConfig), argv, prog="srdrl-eval",
                        description=__doc__.split("\n\n")[0])


def resolve_paths(cfg: EvalConfig) -> dict[str, Path | None]:
    """Every input and output path, checked before anything slow runs."""
    model = Path(cfg.policy)
    if not model.is_dir():
        raise FileNotFoundError(f"--policy {model}: no such directory")
    try:
        detect_layout(model)
    except CheckpointError as e:
        hint = (f"; the trained policy is in {model / 'policy'}"
                if (model / "policy").is_dir() else "")
        raise FileNotFoundError(f"--policy {e}{hint}") from None
    data = Path(cfg.data_path)
    if not data.is_file():
        raise FileNotFoundError(f"--data_path {data}: no such file")
    if cfg.train_data_path is None:
        train = data.with_name("train.jsonl")
        train = train if train.is_file() and train.resolve() != data.resolve() else None
    elif cfg.train_data_path.lower() == "none":
        train = None
    else:
        train = Path(cfg.train_data_path)
        if not train.is_file():
            raise FileNotFoundError(f"--train_data_path {train}: no such file")
    if cfg.metrics is None:
        metrics = model.resolve().parent / "metrics.jsonl"
        metrics = metrics if metrics.is_file() else None
    else:
        metrics = Path(cfg.metrics)
        if not metrics.is_file():
            raise FileNotFoundError(f"--metrics {metrics}: no such file")
    out = Path(cfg.output_dir) if cfg.output_dir else model / "eval"
    return {"model": model, "data": data, "train": train, "metrics": metrics, "out": out}


def run(cfg: EvalConfig, rewards: RewardConfig) -> dict:
    """Evaluate, diagnose the gate, draw; write OUTPUT_DIR/eval_report.json. Returns the
    report."""
    paths = resolve_paths(cfg)
    val = JsonlDataset(paths["data"])
    train = JsonlDataset(paths["train"]) if paths["train"] is not None else None
    device = "cuda" if torch.cuda.is_available() else None
    policy = VLAPolicy.from_pretrained(paths["model"], device=device)
    out = paths["out"]
    out.mkdir(parents=True, exist_ok=True)

    evaluation, scenes = evaluate_scenes(policy, val, cfg.num_samples, cfg.batch_size,
                                         cfg.seed, rewards, progress=True)
    with open(out / SCENES_FILE, "w") as f:
        for s in scenes:
            f.write(json.dumps({k: v for k, v in s.items() if k != "predictions"}) + "\n")
    gate_scores = gate = None
    if train is not None:
        gate_scores = score_labels(train, rewards, cfg.batch_size, progress=True)
        gate = gate_statistics(gate_scores, rewards)
    pictures = []
    if cfg.pictures > 0:
        pictures = draw_pictures(val, scenes, out / "pictures", cfg.pictures,
                                 paths["metrics"], gate_scores, gate)
    report = {
        "model": str(paths["model"]),
        "data_path": str(paths["data"]),
        "train_data_path": None if paths["train"] is None else str(paths["train"]),
        "metrics_path": None if paths["metrics"] is None else str(paths["metrics"]),
        "seed": cfg.seed,
        "backend": rewards.scoring_backend,
        "evaluation": evaluation,
        "gate_diagnostics": gate,
        "pictures": [str(p.relative_to(out)) for p in pictures],
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    print_summary(evaluation)
    if gate is not None:
        print_gate_summary(gate)
    print(f"report: {out / REPORT_FILE}" + (f"; pictures: {out / 'pictures'}" if pictures
                                            else ""))
    return report


def main(argv: list[str] | None = None) -> None:
    cfg, rewards = parse_args(argv)
    try:
        run(cfg, rewards)
    except (FileNotFoundError, DataError) as e:  # bad inputs: say which, no traceback
        raise SystemExit(f"srdrl-eval: error: {e}") from None


if __name__ == "__main__":
    main()
