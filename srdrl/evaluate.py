"""Evaluation: a trained policy on held-out scenes, and the trust gate on training labels.

The policy is evaluated in three reasoning modes, side by side (docs/DESIGN.md,
"Evaluation"): ``generated`` (the headline: the policy writes its reasoning from the
prompt and images, then the expert reads it, as at inference), ``oracle`` (the dataset's
text teacher-forced, as in training; a DIAGNOSTIC, since the synthetic text states the
answer) and ``none`` (no reasoning in the prefix). For each mode K trajectories are drawn
per scene, from noise keyed by (seed, scene) so that every mode, frame variant and batch
size sees the same noise; the first sample (noise scale 1) is the prediction, min-ADE
takes the best of the K. With ``num_seeds`` > 1 every metric is the mean over the noise
seeds seed .. seed + num_seeds - 1, and the report gives their spread.

Metrics need the evaluation-only fields ``clean_trajectory`` and ``hazards``: hazard
crossing uses the vehicle footprint (half-width ``VEHICLE_HALF_WIDTH`` = 0.9 m; a path
with a non-finite coordinate counts as crossing), ADE/FDE compare with the clean
trajectory. With ``intent`` and ``hazards`` the reasoning is scored too: hazard kind, side
and manoeuvre stated by the text the expert read (``srdrl.reasoning_facts``), and the
prediction's agreement with the scene's true manoeuvre. The image ablation repeats
everything with every scene's frames replaced by one hazard-free road, and with frames
shuffled across scenes: what the policy takes from its images is measured, not assumed.

The CLI also reports how well the trust gate finds the wrong labels of the training data
(``srdrl.gate_diagnostics``, no policy needed; it reads the dataset's reasoning, as the
seed's training does).

    srdrl-eval --policy runs/x/policy --data_path data/val.jsonl
    srdrl-eval --policy runs/x/policy --data_path data/val.jsonl --num_samples 8 \\
        --num_seeds 3 --output_dir runs/x/eval --pictures 6 --scoring_backend kornia
    srdrl-eval --config eval.yaml --seed 1        # values from a file, flags override

writes OUTPUT_DIR/eval_report.json (default OUTPUT_DIR = POLICY/eval),
OUTPUT_DIR/eval_scenes.jsonl (one row per validation scene) and PNGs under
OUTPUT_DIR/pictures: camera frames with the paths drawn on, a bird's-eye view per chosen
scene (both from the headline mode, named in their titles), the image-ablation chart, the
label-safety histogram of the gate diagnostics and the training curves of
POLICY/../metrics.jsonl (all but the camera frames need matplotlib, the ``plot`` extra).
Every flag, the trust gate's thresholds among them, is listed by ``srdrl-eval --help``.
"""

from __future__ import annotations

import dataclasses
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
from srdrl.data.dataset import DataError, JsonlDataset, collate, scored_images
from srdrl.data.render import render_frames
from srdrl.data.scenes import sample_scene
from srdrl.errors import run_command
from srdrl.eval_metrics import (  # noqa: F401 (crosses_any_hazard, comfort: re-exported)
    MODE_NOTES,
    comfort,
    crosses_any_hazard,
    over_seeds,
    print_summary,
    scene_rows,
    summarise,
)
from srdrl.footprint import VEHICLE_HALF_WIDTH
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
from srdrl.policy.generation import REASONING_MODES, generate_reasoning, reasoning_prefix
from srdrl.policy.model import VLM_INPUTS_KEY
from srdrl.policy.noise import SceneNoise, scene_seed

REPORT_FILE = "eval_report.json"
SCENES_FILE = "eval_scenes.jsonl"
FRAME_VARIANTS = ("camera", "hazard_free_road", "shuffled_frames")
"""camera: the scenes' own frames; hazard_free_road: every scene sees one hazard-free
road; shuffled_frames: every scene sees another scene's frames."""


# --------------------------------------------------------------------------- frames


def hazard_free_frames(dataset: JsonlDataset, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Frames (F, H, W, 3) of a road with no hazard: the first scene whose ``hazards`` is
    empty, else one rendered with the first scene's camera, size and frame count."""
    for i, record in enumerate(dataset.records):
        if "hazards" in record["eval"] and not record["eval"]["hazards"]:
            return dataset[i]["images"], f"the frames of {record['sample_id']} (no hazard)"
    first = dataset[0]
    frames, height, width = first["images"].shape[:3]
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, p_in_path=0.0, p_distractor=0.0)
    images = render_frames(scene, first["K"].double().numpy(),
                           first["T_cam_from_ego"].double().numpy(), width, height, frames, rng)
    return torch.from_numpy(np.stack(images)), "a rendered hazard-free road"


class FrameAblation:
    """The frames each scene's VLM sees in a frame variant (``FRAME_VARIANTS``)."""

    def __init__(self, dataset: JsonlDataset, seed: int = 0):
        self.dataset = dataset
        self.road, road_source = hazard_free_frames(dataset, seed)
        order = np.random.default_rng(seed).permutation(len(dataset))
        self.partner = np.empty(len(dataset), dtype=np.int64)
        self.partner[order] = np.roll(order, -1)  # a cycle: no scene keeps its own frames
        self.variants = FRAME_VARIANTS if len(dataset) > 1 else FRAME_VARIANTS[:2]
        self.notes = {"camera": "the scenes' own frames",
                      "hazard_free_road": f"every scene sees {road_source}",
                      "shuffled_frames": "every scene sees another scene's frames"}

    def apply(self, batch: dict, variant: str) -> dict:
        if variant == "camera":
            return batch
        if variant == "hazard_free_road":
            images = self.road.unsqueeze(0).expand(len(batch["index"]), *self.road.shape)
        else:
            images = torch.stack([self.dataset[int(self.partner[i])]["images"]
                                  for i in batch["index"]])
        if images.shape != batch["images"].shape:
            raise DataError(f"{self.dataset.path}: the {variant} frames {tuple(images.shape)} "
                            f"do not match the scenes' {tuple(batch['images'].shape)} "
                            f"({batch['sample_id']})")
        out = {k: v for k, v in batch.items() if k != VLM_INPUTS_KEY}
        out["images"] = images.contiguous()
        return out


# --------------------------------------------------------------------------- evaluation


def texts_read(mode: str, batch: dict, reasoning) -> list[str]:
    """The reasoning the expert read in ``mode``: generated, the dataset's, or none."""
    if mode == "generated":
        return reasoning.texts
    return list(batch["reasoning_text"]) if mode == "oracle" else [""] * len(batch["index"])


@torch.no_grad()
def evaluate_scenes(
    policy: VLAPolicy,
    dataset: JsonlDataset,
    num_samples: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    rewards: RewardConfig | None = None,
    progress: bool = True,
    modes: tuple[str, ...] = REASONING_MODES,
    num_seeds: int = 1,
    image_ablation: bool = True,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    compile_decode: bool = False,
) -> tuple[dict, list[dict]]:
    """The report of :func:`evaluate_policy` and one row per scene for the first mode on the
    scenes' own frames at the first seed (its K trajectories under ``predictions``, (K, T, 3)
    float32, the first being the prediction; every mode's text under ``reasoning``)."""
    if "clean_trajectory" not in dataset.records[0]["eval"]:
        raise DataError(f"{dataset.path} has no evaluation fields (clean_trajectory, hazards)")
    unknown = [m for m in modes if m not in REASONING_MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be some of {REASONING_MODES}, got {modes}")
    neutral = (rewards or RewardConfig()).neutral_alignment
    seeds = [seed + i for i in range(num_seeds)]
    frames = FrameAblation(dataset, seed) if image_ablation else None
    variants = frames.variants if frames is not None else FRAME_VARIANTS[:1]
    rows = {(v, m, s): [] for v in variants for m in modes for s in seeds}
    was_training = policy.training
    policy.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        for variant in variants:
            seen = frames.apply(batch, variant) if frames is not None else batch
            for mode in modes:
                reasoning = prefix = None
                for s in seeds:
                    if mode == "generated" and (reasoning is None or temperature > 0):
                        text_noise = SceneNoise([scene_seed(s, i, 1) for i in batch["index"]])
                        reasoning = generate_reasoning(
                            policy, seen, max_new_tokens, temperature, top_p,
                            generator=text_noise, compile_decode=compile_decode)
                        prefix = None
                    if prefix is None:
                        prefix = reasoning_prefix(policy, seen, mode, reasoning)
                    noise = SceneNoise([scene_seed(s, i) for i in batch["index"]])
                    actions, trajs = sample_trajectories(policy, seen, num_samples,
                                                         generator=noise, prefix=prefix)
                    new = scene_rows(policy, batch, actions, trajs,
                                     texts_read(mode, batch, reasoning), neutral)
                    if (variant, mode, s) != ("camera", modes[0], seeds[0]):
                        for row in new:  # only the pictures' rows keep their paths
                            del row["predictions"]
                    rows[variant, mode, s] += new
    policy.train(was_training)

    def aggregate(variant, mode):
        return over_seeds([summarise(rows[variant, mode, s], num_samples) for s in seeds],
                          seeds)

    report = {
        "scenes": len(dataset), "num_samples": num_samples, "seeds": seeds,
        "headline_mode": modes[0],
        "mode_notes": {m: MODE_NOTES[m] for m in modes},
        "generation": {"max_new_tokens": max_new_tokens or policy.config.max_reasoning_tokens,
                       "temperature": temperature, "top_p": top_p},
        "modes": {m: aggregate("camera", m) for m in modes},
    }
    if frames is not None:
        report["image_ablation"] = {"frames": {v: frames.notes[v] for v in variants}, **{
            v: {m: aggregate(v, m) for m in modes} for v in variants if v != "camera"}}
    scenes = rows["camera", modes[0], seeds[0]]
    for i, scene in enumerate(scenes):  # "stated": what the headline mode's text states
        scene["mode"] = modes[0]
        scene["reasoning"] = {m: rows["camera", m, seeds[0]][i]["reasoning"] for m in modes}
        scene["crosses_by_mode"] = {m: rows["camera", m, seeds[0]][i]["crosses"] for m in modes}
    return report, scenes


def evaluate_policy(policy: VLAPolicy, dataset: JsonlDataset, num_samples: int = 4,
                    batch_size: int = 8, seed: int = 0, rewards: RewardConfig | None = None,
                    progress: bool = True, **options) -> dict:
    """Sample ``num_samples`` trajectories per scene in each reasoning mode and compare them
    with the clean ones; ``options`` are those of :func:`evaluate_scenes` (modes,
    num_seeds, image_ablation, max_new_tokens, temperature, top_p, compile_decode)."""
    return evaluate_scenes(policy, dataset, num_samples, batch_size, seed, rewards,
                           progress, **options)[0]


# --------------------------------------------------------------------------- pictures


def choose_scenes(scenes: list[dict], count: int) -> list[dict]:
    """The most telling scenes first: of the noisy labels, up to half the count the
    prediction left behind most (nearer the clean path than the label by the widest
    margin), then those it followed most; then predictions that cross a hazard, then the
    largest ADE to the clean path."""
    noisy = sorted((s for s in scenes if s["label_noisy"]),
                   key=lambda s: -(s["ade_to_label"] - s["ade"]))
    left = min(len(noisy), (count + 1) // 2)
    followed = noisy[left:][::-1][:count - left]
    others = sorted((s for s in scenes if not s["label_noisy"]),
                    key=lambda s: (not s["crosses"], -s["ade"]))
    return (noisy[:left] + followed + others)[:count]


def _scene_title(s: dict, mode: str) -> str:
    """The scene and the mode; its numbers; the text the expert read."""
    noisy = "noisy label, " if s["label_noisy"] else ""
    crosses = ", crosses hazard" if s["crosses"] else ""
    text = s["reasoning"][mode] if mode != "none" else "(no reasoning)"
    text = text if len(text) <= 90 else text[:87] + "..."
    return (f"{s['sample_id']} [{mode} reasoning]\n{noisy}ADE clean {s['ade']:.1f} m / "
            f"label {s['ade_to_label']:.1f} m{crosses}\n\"{text}\"")


def draw_pictures(dataset: JsonlDataset, scenes: list[dict], out: Path, count: int,
                  metrics: Path | None, gate_scores: LabelScores | None = None,
                  gate: dict | None = None, evaluation: dict | None = None) -> list[Path]:
    """Camera sheet and bird's-eye views of the chosen scenes (the headline mode's paths,
    named in the titles), the image-ablation chart, the gate's label-safety histogram and
    the training curves. Without matplotlib only the camera sheet is drawn."""
    from srdrl import visualize

    out.mkdir(parents=True, exist_ok=True)
    chosen = choose_scenes(scenes, count)
    mode = evaluation["headline_mode"] if evaluation else next(iter(scenes[0]["reasoning"]))
    written = []
    items = []
    for s in chosen:
        sample, rec = dataset[s["index"]], dataset.records[s["index"]]
        items.append({
            "image": scored_images(sample).numpy(), "K": sample["K"].numpy(),
            "T_cam_from_ego": sample["T_cam_from_ego"].numpy(),
            "label": rec["trajectory"], "clean": np.asarray(rec["eval"]["clean_trajectory"]),
            "predictions": s["predictions"], "label_noisy": bool(s["label_noisy"]),
            "hazards": rec["eval"].get("hazards", []), "title": _scene_title(s, mode),
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
    if evaluation is not None and "image_ablation" in evaluation:
        written.append(visualize.plot_image_ablation(evaluation, out / "image_ablation.png"))
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
    val = JsonlDataset(paths["data"], cfg.frame_paths_layout)
    train = (JsonlDataset(paths["train"], cfg.frame_paths_layout) if paths["train"] is not None
             else None)
    device = "cuda" if torch.cuda.is_available() else None
    policy = VLAPolicy.from_pretrained(paths["model"], device=device)
    out = paths["out"]
    out.mkdir(parents=True, exist_ok=True)

    evaluation, scenes = evaluate_scenes(
        policy, val, cfg.num_samples, cfg.batch_size, cfg.seed, rewards, progress=True,
        modes=tuple(cfg.reasoning_modes), num_seeds=cfg.num_seeds,
        image_ablation=cfg.image_ablation, max_new_tokens=cfg.max_new_tokens or None,
        temperature=cfg.temperature, top_p=cfg.top_p, compile_decode=cfg.compile_decode)
    with open(out / SCENES_FILE, "w") as f:
        for s in scenes:
            f.write(json.dumps({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                                for k, v in s.items() if k != "predictions"}) + "\n")
    gate_scores = gate = None
    if train is not None:
        gate_scores = score_labels(train, rewards, cfg.batch_size, progress=True)
        gate = gate_statistics(gate_scores, rewards)
    pictures = []
    if cfg.pictures > 0:
        pictures = draw_pictures(val, scenes, out / "pictures", cfg.pictures,
                                 paths["metrics"], gate_scores, gate, evaluation)
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
    try:  # bad data (a UserError): one line, exit code 2, no traceback
        run_command("srdrl-eval", lambda: run(cfg, rewards))
    except FileNotFoundError as e:  # a path flag naming nothing: say which, no traceback
        raise SystemExit(f"srdrl-eval: error: {e}") from None


if __name__ == "__main__":
    main()
