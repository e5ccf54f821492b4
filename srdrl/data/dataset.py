"""JSONL dataset in the original trainer's format, and its collate.

Each line is one scene. Required fields: ``frame_paths`` (list of image paths, the last at
t0; relative paths are resolved against the JSONL file's directory), ``reasoning`` (str)
and ``trajectory`` (64 x 2 or 64 x 3, ego frame at t0, metres; 64 x 2 gets z = 0).

Optional fields and their defaults:

- ``camera``: ``{"K": 3x3, "T_cam_from_ego": 4x4, "width", "height"}``. Missing: the
  synthetic front camera (``srdrl.camera.default_camera``) at the image's size.
- ``ego_history_xyz``: 16 x 3 (or 16 x 2), ending at the origin. Missing: straight
  constant-speed motion along x at the speed of the first future step.
- ``sample_id``: missing gives ``"<file stem>:<line>"``.
- evaluation-only: ``clean_trajectory``, ``label_noisy``, ``hazards``, ``intent``: passed
  through in ``sample["eval"]`` when present.

Lines are parsed and checked when the dataset is opened, so a bad file fails before
training starts, with the file and line named. Images are read in ``__getitem__``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from srdrl.camera import default_camera
from srdrl.timegrid import DT
from srdrl.timegrid import HISTORY_STEPS as NUM_HISTORY
from srdrl.timegrid import NUM_STEPS as NUM_FUTURE

EVAL_FIELDS = ("clean_trajectory", "label_noisy", "hazards", "intent")


class DataError(ValueError):
    """A data file or image that cannot be used, with where it is."""


def _array(value, name: str, shape_options: list[tuple], where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: field '{name}' is not a numeric array ({e})") from None
    if arr.shape not in shape_options:
        wanted = " or ".join("x".join(map(str, s)) for s in shape_options)
        raise DataError(f"{where}: field '{name}' has shape {arr.shape}, expected {wanted}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{where}: field '{name}' contains NaN or inf")
    return arr


def _pad_z(arr: np.ndarray) -> np.ndarray:
    if arr.shape[-1] == 2:
        arr = np.concatenate([arr, np.zeros_like(arr[..., :1])], axis=-1)
    return arr


def default_history(trajectory: np.ndarray) -> np.ndarray:
    """Straight constant-speed history (16, 3) at the speed of the first future step."""
    speed = float(np.linalg.norm(trajectory[0, :2])) / DT
    x = -speed * DT * np.arange(NUM_HISTORY - 1, -1, -1, dtype=np.float64)
    return np.stack([x, np.zeros_like(x), np.zeros_like(x)], axis=-1)


def parse_record(record: dict, where: str) -> dict:
    """Validate one JSONL record and normalise its arrays. Raises DataError."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a line must hold a JSON object, got {type(record).__name__}")
    for key in ("frame_paths", "reasoning", "trajectory"):
        if key not in record:
            raise DataError(f"{where}: missing required field '{key}'")
    paths = record["frame_paths"]
    if isinstance(paths, str):
        paths = [paths]
    if not paths or not all(isinstance(p, str) for p in paths):
        raise DataError(f"{where}: 'frame_paths' must be a non-empty list of strings")
    if not isinstance(record["reasoning"], str):
        raise DataError(f"{where}: 'reasoning' must be a string")
    traj = _pad_z(_array(record["trajectory"], "trajectory",
                         [(NUM_FUTURE, 2), (NUM_FUTURE, 3)], where))
    if "ego_history_xyz" in record:
        hist = _pad_z(_array(record["ego_history_xyz"], "ego_history_xyz",
                             [(NUM_HISTORY, 2), (NUM_HISTORY, 3)], where))
    else:
        hist = default_history(traj)
    camera = record.get("camera")
    if camera is not None:
        if not isinstance(camera, dict) or not {"K", "T_cam_from_ego"} <= camera.keys():
            raise DataError(f"{where}: 'camera' must hold 'K' and 'T_cam_from_ego'")
        camera = {
            "K": _array(camera["K"], "camera.K", [(3, 3)], where),
            "T_cam_from_ego": _array(camera["T_cam_from_ego"], "camera.T_cam_from_ego",
                                     [(4, 4)], where),
            "width": camera.get("width"),
            "height": camera.get("height"),
        }
    return {
        "sample_id": str(record.get("sample_id", where)),
        "frame_paths": paths,
        "reasoning": record["reasoning"],
        "trajectory": traj,
        "ego_history_xyz": hist,
        "camera": camera,
        "eval": {k: record[k] for k in EVAL_FIELDS if k in record},
    }


def read_jsonl(path: str | Path) -> list[dict]:
    """Parse and validate every line of a JSONL file (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            parsed = parse_record(record, where)
            if "sample_id" not in record:
                parsed["sample_id"] = f"{path.stem}:{lineno}"
            parsed["frame_paths"] = [str(_resolve(p, path.parent)) for p in parsed["frame_paths"]]
            records.append(parsed)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _resolve(p: str, base: Path) -> Path:
    q = Path(p)
    return q if q.is_absolute() else base / q


def load_image(path: str) -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3)."""
    if not Path(path).is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"cannot decode image {path}: {e}") from None


class JsonlDataset(torch.utils.data.Dataset):
    """Scenes from one JSONL file. Items are dicts of tensors plus ``reasoning_text``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records = read_jsonl(self.path)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        frames = [load_image(p) for p in rec["frame_paths"]]
        h, w = frames[-1].shape[:2]
        for p, f in zip(rec["frame_paths"], frames, strict=True):
            if f.shape[:2] != (h, w):
                raise DataError(f"{p}: frame size {f.shape[1]}x{f.shape[0]} differs from the "
                                f"t0 frame's {w}x{h} in {rec['sample_id']}")
        cam = rec["camera"]
        if cam is None:
            K, T = default_camera(w, h)
        else:
            cw, ch = cam["width"], cam["height"]
            if (cw is not None and cw != w) or (ch is not None and ch != h):
                raise DataError(f"{rec['frame_paths'][-1]}: image is {w}x{h} but its camera "
                                f"says {cw}x{ch} ({rec['sample_id']})")
            K, T = torch.as_tensor(cam["K"]), torch.as_tensor(cam["T_cam_from_ego"])
        return {
            "index": index,  # position in the file: seeds this scene's noise
            "sample_id": rec["sample_id"],
            "images": torch.from_numpy(np.stack(frames)),  # (F, H, W, 3) uint8
            "trajectory": torch.as_tensor(rec["trajectory"], dtype=torch.float32),  # (64, 3)
            "ego_history_xyz": torch.as_tensor(rec["ego_history_xyz"], dtype=torch.float32),
            "K": K.to(torch.float32),  # (3, 3)
            "T_cam_from_ego": T.to(torch.float32),  # (4, 4)
            "reasoning_text": rec["reasoning"],
            "eval": rec["eval"],
        }


def collate(samples: list[dict]) -> dict:
    """Stack tensors; keep ``index``, ``reasoning_text``, ``sample_id``, ``eval`` as lists."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    out = {}
    for key, value in samples[0].items():
        values = [s[key] for s in samples]
        if isinstance(value, torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise DataError(f"cannot batch '{key}' of different shapes {sorted(shapes)} "
                                f"(samples {[s['sample_id'] for s in samples]})")
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out

