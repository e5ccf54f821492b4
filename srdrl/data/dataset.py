"""JSONL dataset in the original trainer's format, its checks, and its collate.

Each line is one scene. Required fields: ``frame_paths`` (list of image paths, the last at
t0; relative paths are resolved against the JSONL file's directory), ``reasoning`` (str)
and ``trajectory`` (64 x 2 or 64 x 3, ego frame at t0, metres; 64 x 2 gets z = 0).

``frame_paths`` is read by one of ``srdrl.config.FRAME_LAYOUTS`` (``--frame_paths_layout``):
``frames`` (srdrl's own: every entry is a camera frame the VLM sees, oldest first, and the
last one, at t0, is the image the rewards score) or ``frames_then_scoring_image`` (the
original SRD-RL script's: every entry but the last is a frame the VLM sees, and the last is
the image the rewards score, which may have its own size; a missing ``ego_history_xyz`` is
then the original's synthetic one, straight at ``SEED_HISTORY_SPEED``, 5 m/s).

Optional fields and their defaults:

- ``camera``: ``{"K": 3x3, "T_cam_from_ego": 4x4, "width", "height"}``, all four
  required; the camera of the scored image. Missing: ``srdrl.camera.default_camera`` at the
  scored image's size.
- ``ego_history_xyz``: 16 x 3 (or 16 x 2), ending at the origin. Missing: straight
  constant-speed motion along x at the speed of the first future step.
- ``sample_id``: missing gives ``"<file stem>:<line>"``.
- evaluation-only: ``clean_trajectory``, ``label_noisy``, ``hazards``, ``intent``: passed
  through in ``sample["eval"]`` when present (``clean_trajectory`` checked like
  ``trajectory`` and padded to 64 x 3).

Everything is checked when the dataset opens, before training starts; a ``DataError``
(a ``UserError``: one line, exit code 2 from the commands) names the file, the line and
the field. The limits:

- Paths (``trajectory``, ``ego_history_xyz``, ``clean_trajectory``): finite, every
  coordinate within ``COORD_LIMIT`` (1000 m), and no step between consecutive poses longer
  than ``STEP_LIMIT`` (10 m per 0.1 s step, 100 m/s); a future path's first step starts at
  the origin.
- Camera: ``srdrl.camera.validate_camera`` (K finite and invertible with K[2] = [0, 0, 1],
  fx, fy > 0 and the principal point on the image; T finite, last row [0, 0, 0, 1], a
  rotation within 1e-3), and ``width``/``height`` equal to the images' size.
- Images: every frame exists, and its header (read without decoding) has an accepted
  mode; all frames of a scene have one size (a separate scoring image may differ).
  Accepted: ``IMAGE_MODES`` -- 8-bit RGB as
  is (a 16-bit-per-channel RGB PNG is read at its high 8 bits, which is the same picture);
  grey ``L`` and palette ``P`` converted to RGB; ``RGBA``/``LA`` (and a palette with a
  transparent colour) when fully opaque, alpha dropped (checked when decoded). Refused:
  16-bit grey (``I;16*``, which would load as white), 32-bit ``I``, float ``F``, 1-bit,
  CMYK and the other modes. Decoding (in ``__getitem__``) fails on a truncated file.
- Labels the action space cannot represent (``traj_to_action`` of the label outside
  ``action_in_bounds``: |accel| <= 4 m/s^2, |curvature| <= 0.2 1/m; a reversing label
  needs tens of std): a warning, one line per file on stderr, with the count and the
  worst few as file:line, sample id and action in std units; they are still trained on.
  A warning, not an error: labels a little past these plausibility limits are ordinary
  (1 % of srdrl-make-data's labels swerve at up to 1.2x the curvature bound), and an
  error would refuse such files outright. How it stays fast: ``srdrl.data.label_bounds``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from srdrl.camera import CameraError, default_camera, validate_camera
from srdrl.config import check_frame_paths_layout
from srdrl.data.label_bounds import warn_out_of_bounds
from srdrl.errors import UserError
from srdrl.timegrid import DT
from srdrl.timegrid import HISTORY_STEPS as NUM_HISTORY
from srdrl.timegrid import NUM_STEPS as NUM_FUTURE

SEED_HISTORY_SPEED = 5.0
"""m/s of the straight history the original script synthesised for every scene."""

EVAL_FIELDS = ("clean_trajectory", "label_noisy", "hazards", "intent")

COORD_LIMIT = 1000.0
"""Largest |x|, |y|, |z| of any pose, metres: a 1e30 in a label is an error, not inf loss."""
STEP_LIMIT = 10.0
"""Longest move between consecutive poses, metres per 0.1 s step (100 m/s)."""
IMAGE_MODES = {"RGB": "as is", "L": "grey to RGB", "P": "palette to RGB",
               "RGBA": "alpha dropped if fully opaque", "LA": "alpha dropped if fully opaque"}
"""Pillow modes accepted, and what decoding does to each to get 8-bit RGB."""


class DataError(UserError, ValueError):
    """A data file or image that cannot be used, with where it is."""


def check_data_file(path: str | Path, flag: str = "--data_path") -> Path:
    """``path`` as a JSONL file given by ``flag``; a DataError says what it is instead."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.jsonl"), key=lambda p: (p.name != "train.jsonl", p.name))
        given = f"{flag} " if flag.startswith("-") else ""  # repeat a command-line flag
        hint = " or ".join(f"{given}{p}" for p in found[:3] or [path / "train.jsonl"])
        raise DataError(f"{flag} {path} is a directory, not a JSONL file; did you mean {hint}?")
    if not path.exists():
        raise DataError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise DataError(f"{flag} {path} is not a regular file")
    return path


# --------------------------------------------------------------------------- one line


def _numeric(value, name: str, shape_options: list[tuple], where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{where}: field '{name}' is not a numeric array ({e})") from None
    if arr.shape not in shape_options:
        wanted = " or ".join("x".join(map(str, s)) for s in shape_options)
        raise DataError(f"{where}: field '{name}' has shape {arr.shape}, expected {wanted}")
    return arr


def _array(value, name: str, shape_options: list[tuple], where: str) -> np.ndarray:
    arr = _numeric(value, name, shape_options, where)
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: field '{name}' contains NaN or inf")
    return arr


def _path(value, name: str, steps: int, where: str, from_origin: bool) -> np.ndarray:
    """A (steps, 2|3) path checked to be finite and within COORD_LIMIT and STEP_LIMIT,
    padded to z = 0."""
    arr = _numeric(value, name, [(steps, 2), (steps, 3)], where)
    if arr.shape[-1] == 2:
        arr = np.concatenate([arr, np.zeros_like(arr[:, :1])], axis=-1)
    with np.errstate(invalid="ignore", over="ignore"):  # inf and huge values: named below
        moves = np.diff(arr, axis=0)  # (steps - 1, 3)
        step2 = np.einsum("ij,ij->i", moves, moves)  # squared step lengths, m^2
        first2 = float(arr[0] @ arr[0]) if from_origin else 0.0  # the step from the origin
    # One comparison each: NaN fails them too, and is then named below.
    if np.abs(arr).max() <= COORD_LIMIT and max(step2.max(), first2) <= STEP_LIMIT**2:
        return arr
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: field '{name}' contains NaN or inf")
    far = np.argwhere(np.abs(arr) > COORD_LIMIT)
    if len(far):
        row, axis = far[0]
        raise DataError(f"{where}: field '{name}' row {row}: |{'xyz'[axis]}| = "
                        f"{abs(arr[row, axis]):.3g} m is past the {COORD_LIMIT:g} m limit")
    step = np.sqrt(np.concatenate([[first2], step2]))  # step[r]: the move that arrives at row r
    row = int(np.argmax(step > STEP_LIMIT))
    raise DataError(f"{where}: field '{name}' row {row}: moves {step[row]:.3g} m in one "
                    f"{DT:g} s step ({step[row] / DT:.3g} m/s), past the {STEP_LIMIT:g} m limit")


def default_history(trajectory: np.ndarray) -> np.ndarray:
    """Straight constant-speed history (16, 3) at the speed of the first future step."""
    return straight_history(float(np.linalg.norm(trajectory[0, :2])) / DT)


def straight_history(speed: float) -> np.ndarray:
    """History (16, 3) of straight motion along x at ``speed`` m/s, ending at the origin."""
    x = -speed * DT * np.arange(NUM_HISTORY - 1, -1, -1, dtype=np.float64)
    return np.stack([x, np.zeros_like(x), np.zeros_like(x)], axis=-1)


def _camera(camera, where: str, checked: set | None = None) -> dict:
    """The camera's arrays, validated; ``checked`` memoises cameras already found good (a
    file usually repeats one camera on every line)."""
    if not isinstance(camera, dict):
        raise DataError(f"{where}: field 'camera' must be an object with K, T_cam_from_ego, "
                        f"width and height")
    for key in ("K", "T_cam_from_ego", "width", "height"):
        if key not in camera:
            why = (" (the image size that K belongs to)" if key in ("width", "height") else "")
            raise DataError(f"{where}: field 'camera.{key}' is missing{why}")
    K = _array(camera["K"], "camera.K", [(3, 3)], where)
    T = _array(camera["T_cam_from_ego"], "camera.T_cam_from_ego", [(4, 4)], where)
    key = (K.tobytes(), T.tobytes(), repr(camera["width"]), repr(camera["height"]))
    if checked is None or key not in checked:
        try:
            validate_camera(K, T, camera["width"], camera["height"])
        except CameraError as e:
            raise DataError(f"{where}: field 'camera.{e.field}' {e.problem}") from None
        if checked is not None:
            checked.add(key)
    return {"K": K, "T_cam_from_ego": T, "width": camera["width"], "height": camera["height"]}


def parse_record(record: dict, where: str, cameras: set | None = None,
                 layout: str = "frames") -> dict:
    """Validate one JSONL record and normalise its arrays. Raises DataError. ``cameras``
    memoises the cameras already validated; ``layout`` is one of
    ``srdrl.config.FRAME_LAYOUTS``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a line must hold a JSON object, got {type(record).__name__}")
    for key in ("frame_paths", "reasoning", "trajectory"):
        if key not in record:
            raise DataError(f"{where}: missing required field '{key}'")
    paths = record["frame_paths"]
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise DataError(f"{where}: field 'frame_paths' must be a non-empty list of strings")
    scoring_path = None
    if layout == "frames_then_scoring_image":
        if len(paths) < 2:
            raise DataError(f"{where}: field 'frame_paths' must hold at least one frame and "
                            f"then the scoring image (frame_paths_layout "
                            f"frames_then_scoring_image), got {len(paths)} path")
        paths, scoring_path = paths[:-1], paths[-1]
    else:
        check_frame_paths_layout(layout)
    if not isinstance(record["reasoning"], str):
        raise DataError(f"{where}: field 'reasoning' must be a string")
    traj = _path(record["trajectory"], "trajectory", NUM_FUTURE, where, from_origin=True)
    if "ego_history_xyz" in record:
        hist = _path(record["ego_history_xyz"], "ego_history_xyz", NUM_HISTORY, where,
                     from_origin=False)
    elif scoring_path is not None:
        hist = straight_history(SEED_HISTORY_SPEED)
    else:
        hist = default_history(traj)
    camera = record.get("camera")
    evaluation = {k: record[k] for k in EVAL_FIELDS if k in record}
    if "clean_trajectory" in evaluation:
        evaluation["clean_trajectory"] = _path(evaluation["clean_trajectory"],
                                               "clean_trajectory", NUM_FUTURE, where,
                                               from_origin=True).tolist()
    return {
        "sample_id": str(record.get("sample_id", where)),
        "where": where,
        "frame_paths": paths,
        "scoring_path": scoring_path,
        "reasoning": record["reasoning"],
        "trajectory": traj,
        "ego_history_xyz": hist,
        "camera": None if camera is None else _camera(camera, where, cameras),
        "eval": evaluation,
    }


def read_jsonl(path: str | Path, layout: str = "frames") -> list[dict]:
    """Parse and validate every line of a JSONL file (blank lines are skipped), its
    ``frame_paths`` read by ``layout`` (``srdrl.config.FRAME_LAYOUTS``). Images are not
    opened here: ``check_images`` does that."""
    path = check_data_file(path, "data file")
    records, cameras = [], set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            parsed = parse_record(record, where, cameras, layout)
            if "sample_id" not in record:
                parsed["sample_id"] = f"{path.stem}:{lineno}"
            parsed["frame_paths"] = [str(_resolve(p, path.parent)) for p in parsed["frame_paths"]]
            if parsed["scoring_path"] is not None:
                parsed["scoring_path"] = str(_resolve(parsed["scoring_path"], path.parent))
            records.append(parsed)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _resolve(p: str, base: Path) -> Path:
    q = Path(p)
    return q if q.is_absolute() else base / q


# --------------------------------------------------------------------------- images


def _mode_problem(mode: str) -> str | None:
    """Why an image of Pillow ``mode`` is refused, or None when it is accepted."""
    if mode in IMAGE_MODES:
        return None
    if mode.startswith("I;16"):
        return f"is 16-bit greyscale (mode {mode}), which would load as white"
    kinds = {"I": "32-bit integer", "F": "32-bit float", "1": "1-bit"}
    return (f"has mode {mode} ({kinds.get(mode, 'not 8-bit RGB, grey or palette')}); "
            f"convert it to 8-bit RGB")


def image_header(path: str, field: str) -> tuple[int, int]:
    """(width, height) of an image from its header, without decoding; DataError on a
    missing file, an unreadable header or a refused mode. ``field`` prefixes messages."""
    if not Path(path).is_file():
        raise DataError(f"{field} ({path}) does not exist")
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
    except (OSError, Image.DecompressionBombError) as e:
        raise DataError(f"{field} ({path}) cannot be read as an image ({e})") from None
    problem = _mode_problem(mode)
    if problem:
        raise DataError(f"{field} ({path}) {problem}")
    return size


def check_images(records: list[dict]) -> None:
    """Open every image's header (each file once): existence, mode, one size for the frames
    of a scene, the camera's width/height against the scored image. Stores
    ``record["image_size"]`` (W, H) of the frames and ``record["scored_size"]`` of the
    scored image (the scoring image, else the last frame)."""
    sizes: dict[str, tuple[int, int]] = {}

    def size_of(p: str, field: str) -> tuple[int, int]:
        if p not in sizes:
            sizes[p] = image_header(p, field)
        return sizes[p]

    for rec in records:
        first = None
        for i, p in enumerate(rec["frame_paths"]):
            field = f"{rec['where']}: field 'frame_paths[{i}]'"
            w, h = size_of(p, field)
            if first is None:
                first = (w, h)
            elif (w, h) != first:
                raise DataError(f"{field} ({p}) is {w}x{h}, but frame_paths[0] is "
                                f"{first[0]}x{first[1]}; the frames of a scene share one size")
        scored, scored_path = first, rec["frame_paths"][-1]
        if rec["scoring_path"] is not None:
            scored_path = rec["scoring_path"]
            scored = size_of(scored_path, f"{rec['where']}: field "
                                          f"'frame_paths[{len(rec['frame_paths'])}]'")
        cam = rec["camera"]
        if cam is not None and (cam["width"], cam["height"]) != scored:
            raise DataError(f"{rec['where']}: field 'camera.width'/'camera.height' say "
                            f"{cam['width']}x{cam['height']}, but the scored image is "
                            f"{scored[0]}x{scored[1]} ({scored_path})")
        rec["image_size"], rec["scored_size"] = first, scored


def load_image(path: str, field: str = "image") -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3) by the rules of ``IMAGE_MODES``."""
    if not Path(path).is_file():
        raise DataError(f"{field} ({path}) does not exist")
    try:
        with Image.open(path) as im:
            problem = _mode_problem(im.mode)
            if problem:
                raise DataError(f"{field} ({path}) {problem}")
            transparent = im.mode in ("RGBA", "LA") or "transparency" in im.info
            pixels = np.array(im.convert("RGBA" if transparent else "RGB"))  # writable
    except (OSError, Image.DecompressionBombError) as e:  # a truncated or corrupt file
        raise DataError(f"{field} ({path}) cannot be decoded ({e})") from None
    if transparent:
        if pixels[..., 3].min() < 255:
            raise DataError(f"{field} ({path}) has transparent pixels; give opaque RGB")
        pixels = np.ascontiguousarray(pixels[..., :3])
    return pixels


# --------------------------------------------------------------------------- dataset


class JsonlDataset(torch.utils.data.Dataset):
    """Scenes from one JSONL file, checked when opened (see the module docstring). Items
    are dicts of tensors plus ``reasoning_text``. ``out_of_bounds`` lists the file:line of
    labels the action space cannot represent (warned about once)."""

    def __init__(self, path: str | Path, frame_paths_layout: str = "frames"):
        self.path = Path(path)
        self.frame_paths_layout = frame_paths_layout
        self.records = read_jsonl(self.path, frame_paths_layout)
        check_images(self.records)
        self.out_of_bounds = warn_out_of_bounds(self.path, self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        frames = [self._image(rec, i, p, rec["image_size"])
                  for i, p in enumerate(rec["frame_paths"])]
        cam = rec["camera"]
        if cam is None:
            K, T = default_camera(*rec["scored_size"])
        else:
            K, T = torch.as_tensor(cam["K"]), torch.as_tensor(cam["T_cam_from_ego"])
        item = {
            "index": index,  # position in the file: seeds this scene's noise
            "sample_id": rec["sample_id"],
            "where": rec["where"],  # file:line
            "images": torch.from_numpy(np.stack(frames)),  # (F, H, W, 3) uint8
            "trajectory": torch.as_tensor(rec["trajectory"], dtype=torch.float32),  # (64, 3)
            "ego_history_xyz": torch.as_tensor(rec["ego_history_xyz"], dtype=torch.float32),
            "K": K.to(torch.float32),  # (3, 3)
            "T_cam_from_ego": T.to(torch.float32),  # (4, 4)
            "reasoning_text": rec["reasoning"],
            "eval": rec["eval"],
        }
        if rec["scoring_path"] is not None:  # (H', W', 3) uint8
            item[SCORING_IMAGE_KEY] = torch.from_numpy(self._image(
                rec, len(rec["frame_paths"]), rec["scoring_path"], rec["scored_size"]))
        return item

    @staticmethod
    def _image(rec: dict, i: int, path: str, size: tuple[int, int]) -> np.ndarray:
        field = f"{rec['where']}: field 'frame_paths[{i}]'"
        image = load_image(path, field)
        if image.shape[1::-1] != size:  # the file changed since the check
            raise DataError(f"{field} ({path}) decodes to {image.shape[1]}x{image.shape[0]}, "
                            f"but its header said {size[0]}x{size[1]}")
        return image


SCORING_IMAGE_KEY = "scoring_image"
"""Batch key of the image the rewards score, where it is not the last frame."""


def scored_images(batch: dict) -> torch.Tensor:
    """The images the rewards score, (B, H, W, 3) uint8 of a batch or (H, W, 3) of one
    item: the scoring image where the data has one (``frames_then_scoring_image``), else
    the last frame (t0)."""
    if SCORING_IMAGE_KEY in batch:
        return batch[SCORING_IMAGE_KEY]
    return batch["images"].select(-4, -1)


def collate(samples: list[dict]) -> dict:
    """Stack tensors; keep ``index``, ``reasoning_text``, ``sample_id``, ``where``, ``eval``
    as lists. Tensors of different shapes (images of different sizes in one batch) are a
    DataError naming the first scene that differs and the batch's first scene."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    out = {}
    for key, value in samples[0].items():
        values = [s[key] for s in samples]
        if isinstance(value, torch.Tensor):
            odd = next((s for s in samples if s[key].shape != value.shape), None)
            if odd is not None:
                raise DataError(
                    f"{_where(odd)}: field '{FIELD_OF_KEY.get(key, key)}' gives {key} of shape "
                    f"{tuple(odd[key].shape)}, but "
                    f"{_where(samples[0])} in the same batch has {tuple(value.shape)}; scenes "
                    f"batched together need equal shapes (one image size)")
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


FIELD_OF_KEY = {"images": "frame_paths", SCORING_IMAGE_KEY: "frame_paths"}
"""The JSONL field a batch key comes from, where the names differ."""


def _where(sample: dict) -> str:
    return sample.get("where", sample.get("sample_id", "a sample"))
