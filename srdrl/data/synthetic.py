"""``srdrl-make-data``: synthetic off-road driving scenes with noisy labels.

    srdrl-make-data --output_dir data --num_scenes 1000 --label_noise 0.3 --seed 0
    srdrl-make-data --config data.yaml --label_noise 0.1     # flags override the file

writes ``OUTPUT_DIR/train.jsonl``, ``OUTPUT_DIR/val.jsonl`` and PNG frames under
``OUTPUT_DIR/frames/``. Scene i is drawn from its own generator seeded with (seed, i), and
the decision to corrupt its label from another seeded with (seed, i, 1): the same seed
gives the same scenes at every noise level, so runs at 0%, 10% and 30% noise differ only
in their labels.

Label noise: with probability ``label_noise`` a scene that has a hazard in the way gets
the straight-through trajectory as its label; its reasoning stays correct. The
evaluation-only fields (``clean_trajectory``, ``label_noisy``, ``hazards``) say what
happened.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from srdrl.camera import default_camera
from srdrl.cli import parse_config
from srdrl.data.render import render_frames
from srdrl.data.scenes import sample_scene


@dataclass
class SyntheticDataConfig:
    """How many scenes srdrl-make-data draws, how noisy their labels are, where they go."""

    output_dir: str
    """Directory for train.jsonl, val.jsonl and frames/."""
    num_scenes: int = 1000
    """Scenes in train + val."""
    label_noise: float = 0.3
    """Probability that a scene with a hazard in the way gets the straight-through label."""
    seed: int = 0
    """Seed of the scenes; the same seed gives the same scenes at every label_noise."""
    width: int = 640
    """Image width, pixels."""
    height: int = 384
    """Image height, pixels."""
    frames: int = 1
    """Camera frames per scene (10 Hz, the last at t0)."""
    camera_height: float = 2.0
    """Height of the front camera above the ground, metres."""
    camera_pitch_deg: float = 12.0
    """Downward pitch of the front camera, degrees."""
    camera_hfov_deg: float = 45.0
    """Horizontal field of view of the front camera, degrees."""
    val_fraction: float = 0.1
    """Fraction of the scenes that go to val.jsonl (at least one)."""
    workers: int = 0
    """Processes that draw and render scenes (0: one per usable CPU core, or this process
    alone below 64 scenes); the files are the same for every count."""

    def __post_init__(self):
        if self.num_scenes < 2:
            raise ValueError(f"num_scenes must be >= 2 (train and val), got {self.num_scenes}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise is a probability in [0, 1], got {self.label_noise}")
        if self.width < 16 or self.height < 16:
            raise ValueError(f"image size must be at least 16x16, got {self.width}x{self.height}")
        if not 1 <= self.frames <= 16:
            raise ValueError(f"frames must be in 1..16 (history poses), got {self.frames}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.camera_height <= 0 or not 0 < self.camera_hfov_deg < 180:
            raise ValueError(f"camera_height must be > 0 and camera_hfov_deg in (0, 180), got "
                             f"{self.camera_height}, {self.camera_hfov_deg}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not 0 < self.camera_pitch_deg < 90:
            raise ValueError(f"camera_pitch_deg must be in (0, 90), got {self.camera_pitch_deg}")


def synthetic_camera(cfg: SyntheticDataConfig) -> tuple[np.ndarray, np.ndarray]:
    """``K`` (3, 3) and ``T_cam_from_ego`` (4, 4), float64, of the generated frames."""
    K, T = default_camera(cfg.width, cfg.height, hfov_deg=cfg.camera_hfov_deg,
                          mount_height=cfg.camera_height, pitch_deg=cfg.camera_pitch_deg)
    return K.numpy(), T.numpy()


def _round(a: np.ndarray) -> list:
    return np.round(np.asarray(a, dtype=np.float64), 4).tolist()


def make_scene_record(cfg: SyntheticDataConfig, index: int, *, split: str, root: Path) -> dict:
    """Draw, render and save scene ``index``; return its JSONL record."""
    rng = np.random.default_rng([cfg.seed, index])
    scene = sample_scene(rng)
    noisy = scene.noisy_trajectory is not None and (
        np.random.default_rng([cfg.seed, index, 1]).random() < cfg.label_noise
    )
    K, T = synthetic_camera(cfg)
    frames = render_frames(scene, K, T, cfg.width, cfg.height, cfg.frames, rng)
    sample_id = f"{split}_{index:06d}"
    frame_paths = []
    for k, frame in enumerate(frames):
        rel = f"frames/{sample_id}_{k}.png"
        Image.fromarray(frame).save(root / rel, compress_level=1)
        frame_paths.append(rel)
    label = scene.noisy_trajectory if noisy else scene.clean_trajectory
    return {
        "sample_id": sample_id,
        "frame_paths": frame_paths,
        "reasoning": scene.reasoning,
        "trajectory": _round(label),
        "ego_history_xyz": _round(scene.history),
        "camera": {"K": _round(K), "T_cam_from_ego": _round(T), "width": cfg.width,
                   "height": cfg.height},
        # evaluation-only fields
        "clean_trajectory": _round(scene.clean_trajectory),
        "label_noisy": bool(noisy),
        "intent": scene.intent,
        "hazards": [h.to_json() for h in scene.hazards],
    }


MIN_SCENES_PER_POOL = 64
"""Below this many scenes, workers=0 renders in this process."""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def make_dataset(cfg: SyntheticDataConfig, progress: bool = True) -> dict[str, Path]:
    """Write the dataset; returns the paths of ``train`` and ``val`` JSONL files. Scenes are
    drawn and rendered by ``cfg.workers`` processes and written in index order."""
    root = Path(cfg.output_dir)
    (root / "frames").mkdir(parents=True, exist_ok=True)
    num_val = max(1, round(cfg.val_fraction * cfg.num_scenes))
    splits = {"train": range(cfg.num_scenes - num_val), "val": range(cfg.num_scenes - num_val,
                                                                      cfg.num_scenes)}
    workers = min(cfg.workers or usable_cores(), cfg.num_scenes)
    if not cfg.workers and cfg.num_scenes < MIN_SCENES_PER_POOL:
        workers = 1  # starting the workers would cost more than it saves
    # spawned, not forked: a fork of a process whose torch/OpenMP threads hold locks can
    # deadlock in the child
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            if workers > 1 else None)
    paths = {}
    bar = tqdm(total=cfg.num_scenes, desc="scenes", disable=not progress, unit="scene")
    try:
        for split, indices in splits.items():
            path = root / f"{split}.jsonl"
            tmp = path.with_suffix(".jsonl.tmp")
            draw = partial(make_scene_record, cfg, split=split, root=root)
            records = (pool.map(draw, indices, chunksize=8) if pool is not None
                       else map(draw, indices))
            with open(tmp, "w") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")
                    bar.update()
            os.replace(tmp, path)  # a JSONL file is complete or absent
            paths[split] = path
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return paths


def main(argv: list[str] | None = None) -> None:
    (cfg,) = parse_config((SyntheticDataConfig,), argv, prog="srdrl-make-data",
                          description=__doc__.split("\n\n")[0])
    paths = make_dataset(cfg)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
