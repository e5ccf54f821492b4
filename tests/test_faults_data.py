"""Fault injection, bad input data: each fault of the catalogue (issue 15) is written into an
otherwise good file, and the dataset must refuse it when it opens (or, for what only decoding
can see, when the scene is read) with a ``DataError`` -- a ``UserError`` -- whose one-line
message names the file, the line and the field. Labels the action space cannot represent
are a warning, one line per file. The last tests run srdrl-eval on a corrupted file made
from srdrl-make-data output: exit code 2, one line on stderr, no traceback."""

import json
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from srdrl.action_space import action_in_bounds, traj_to_action
from srdrl.camera import default_camera
from srdrl.data import label_bounds
from srdrl.data.dataset import (
    DataError,
    JsonlDataset,
    check_data_file,
    load_image,
)
from srdrl.data.scenes import sample_scene
from srdrl.errors import UserError

W, H = 40, 30


def _rgb(seed: int, w: int = W, h: int = H) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _good(**changes) -> dict:
    """A scene driving straight at 5 m/s, two frames, the synthetic camera at 40x30."""
    K, T = default_camera(W, H)
    record = {
        "frame_paths": ["a.png", "b.png"],
        "reasoning": "Clear track ahead; keep straight.",
        "trajectory": [[0.5 * (i + 1), 0.0, 0.0] for i in range(64)],
        "ego_history_xyz": [[-0.5 * (15 - i), 0.0, 0.0] for i in range(16)],
        "camera": {"K": K.tolist(), "T_cam_from_ego": T.tolist(), "width": W, "height": H},
        "clean_trajectory": [[0.5 * (i + 1), 0.0] for i in range(64)],
    }
    record.update(changes)
    return record


def _write(tmp_path, *lines) -> str:
    """data.jsonl with a good line 1, then ``lines`` (dicts, str or bytes), and frames."""
    Image.fromarray(_rgb(0)).save(tmp_path / "a.png")
    Image.fromarray(_rgb(1)).save(tmp_path / "b.png")
    path = tmp_path / "data.jsonl"
    raw = [json.dumps(_good()).encode()]
    for line in lines:
        raw.append(line if isinstance(line, bytes) else
                   (line if isinstance(line, str) else json.dumps(line)).encode())
    path.write_bytes(b"\n".join(raw) + b"\n")
    return str(path)


def _refused(path: str, line: int, field: str | None, pattern: str, *, at_read=False) -> str:
    """Open ``path`` (and read every scene when ``at_read``), expect a DataError naming
    ``path:line`` and ``field`` on one line and matching ``pattern``; returns the message."""
    with pytest.raises(DataError) as e:
        ds = JsonlDataset(path)
        assert at_read, "the fault was not caught when the dataset opened"
        for i in range(len(ds)):
            ds[i]
    message = str(e.value)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: "), message
    if field is not None:
        assert f"field '{field}'" in message, message
    assert re.search(pattern, message), message
    return message


def _with_row(field: str, row: int, xyz) -> dict:
    """A good record whose ``field`` has ``xyz`` at ``row``."""
    path = [list(p) for p in _good()[field]]
    path[row] = list(xyz) + [0.0] * (len(path[row]) - len(xyz))
    return _good(**{field: path})


# --------------------------------------------------------------------------- JSONL lines


@pytest.mark.parametrize(
    "line, field, pattern",
    [
        ('{"frame_paths": ["a.png"], "reasoning": ', None, r"malformed JSON \(.* column \d+\)"),
        (b'{"reasoning": "caf\xe9"}', None, r"not UTF-8 text"),
        ("[1, 2, 3]", None, r"must hold a JSON object, got list"),
        ({k: v for k, v in _good().items() if k != "trajectory"}, "trajectory",
         r"missing required field"),
        (_good(reasoning=7), "reasoning", r"must be a string"),
        (_good(frame_paths=[]), "frame_paths", r"non-empty list of strings"),
        (_good(trajectory=[[0.0, 0.0, 0.0, 0.0]] * 64), "trajectory", r"has shape \(64, 4\)"),
        (_good(trajectory=[[1.0, 0.0]] * 32), "trajectory", r"has shape \(32, 2\)"),
        (_good(ego_history_xyz=[[0.0]] * 16), "ego_history_xyz", r"has shape \(16, 1\)"),
        (_good(trajectory=[[1.0, 0.0]] * 63 + [[1.0]]), "trajectory", r"not a numeric array"),
        (_good(trajectory=[["fast", 0.0]] * 64), "trajectory", r"not a numeric array"),
        (_good(trajectory=[[10**400, 0.0]] * 64), "trajectory", r"not a numeric array"),
        (_with_row("trajectory", 5, [1e30, 0.0]), "trajectory",
         r"row 5: \|x\| = 1e\+30 m is past the 1000 m limit"),
        (_with_row("trajectory", 7, [3.5, 0.0, -1e30]), "trajectory", r"row 7: \|z\| = 1e\+30"),
        (_with_row("ego_history_xyz", 2, [-1e30, 0.0]), "ego_history_xyz", r"row 2: \|x\|"),
        (_with_row("clean_trajectory", 0, [0.5, 1e30]), "clean_trajectory", r"row 0: \|y\|"),
        (_with_row("trajectory", 3, [float("nan"), 0.0]), "trajectory", r"contains NaN or inf"),
        (_with_row("ego_history_xyz", 0, [float("-inf"), 0.0]), "ego_history_xyz",
         r"contains NaN or inf"),
        (_with_row("clean_trajectory", 63, [float("nan"), 0.0]), "clean_trajectory",
         r"contains NaN or inf"),
        (_with_row("trajectory", 20, [60.0, 0.0]), "trajectory",
         r"row 20: moves 50 m in one 0.1 s step \(500 m/s\), past the 10 m limit"),
        (_with_row("trajectory", 0, [0.0, 12.0]), "trajectory", r"row 0: moves 12 m"),
        (_with_row("ego_history_xyz", 9, [-300.0, 0.0]), "ego_history_xyz", r"row 9: moves"),
        (_good(camera=[1, 2]), "camera", r"must be an object"),
    ],
    ids=["malformed-json", "not-utf8", "not-an-object", "missing-trajectory",
         "reasoning-not-str", "no-frames", "shape-64x4", "shape-32x2", "history-shape",
         "ragged", "string-value", "overflow", "1e30-x", "1e30-z", "1e30-history",
         "1e30-clean", "nan", "-inf-history", "nan-clean", "teleport", "first-step",
         "history-teleport", "camera-not-object"],
)
def test_bad_line(tmp_path, line, field, pattern):
    _refused(_write(tmp_path, line), 2, field, pattern)


# --------------------------------------------------------------------------- cameras


def _camera(**changes) -> dict:
    cam = dict(_good()["camera"])
    cam.update(changes)
    return {k: v for k, v in cam.items() if v is not None}


def _singular_K():
    K = default_camera(W, H)[0]
    K[0, 0] = K[1, 1] = 0.0  # rank 1: every point projects to the principal point
    return K.tolist()


def _scaled_T():
    T = default_camera(W, H)[1]
    T[:3, :3] *= 2.0
    return T.tolist()


@pytest.mark.parametrize(
    "camera, field, pattern",
    [
        (_camera(K=[[0.0] * 3] * 3), "camera.K", r"is all zeros"),
        (_camera(K=_singular_K()), "camera.K", r"positive focal lengths.*singular"),
        (_camera(K=default_camera(4 * W, 4 * H)[0].tolist()), "camera.K",
         r"principal point .* outside the 40x30 image"),
        (_camera(K=[[20.0, 0, 19.5], [0, 20.0, 14.5], [0, 0, 0]]), "camera.K",
         r"last row \[0, 0, 1\], got \[0, 0, 0\]"),
        (_camera(K=[[20.0, 0, 19.5], [0, float("nan"), 14.5], [0, 0, 1]]), "camera.K",
         r"contains NaN or inf"),
        (_camera(T_cam_from_ego=[[0.0] * 4] * 4), "camera.T_cam_from_ego", r"is all zeros"),
        (_camera(T_cam_from_ego=_scaled_T()), "camera.T_cam_from_ego",
         r"must hold a rotation .* det R = 8"),
        (_camera(T_cam_from_ego=[[1.0, 0, 0, 0]] * 3), "camera.T_cam_from_ego",
         r"has shape \(3, 4\)"),
        (_camera(width=None), "camera.width", r"is missing \(the image size that K belongs"),
        (_camera(height=None), "camera.height", r"is missing"),
        (_camera(width=-40), "camera.width", r"positive integer"),
        (_camera(K=default_camera(2 * W, 2 * H)[0].tolist(), width=2 * W, height=2 * H),
         "camera.width", r"say 80x60, but the scored image is 40x30"),
    ],
    ids=["zero-K", "singular-K", "K-other-resolution", "K-last-row", "nan-K", "zero-T",
         "T-not-rotation", "T-shape", "no-width", "no-height", "negative-width",
         "size-mismatch"],
)
def test_bad_camera(tmp_path, camera, field, pattern):
    _refused(_write(tmp_path, _good(camera=camera)), 2, field, pattern)


# --------------------------------------------------------------------------- images


def _png16(path, pixels: np.ndarray) -> None:
    """Write a 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2,
                                                                         0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _grey16(path):
    Image.fromarray(np.full((H, W), 3000, np.uint16)).save(path)


def _int32(path):
    Image.fromarray(np.full((H, W), 7, np.int32)).save(path)


def _float32(path):
    Image.fromarray(np.full((H, W), 0.5, np.float32)).save(path)


def _bilevel(path):
    Image.new("1", (W, H)).save(path)


def _cmyk(path):
    Image.new("CMYK", (W, H)).save(path)


def _text(path):
    path.write_text("not an image")


def _wider(path):
    Image.fromarray(_rgb(2, w=W + 10)).save(path)


@pytest.mark.parametrize(
    "name, make, pattern",
    [
        ("missing.png", None, r"\(.*missing\.png\) does not exist"),
        ("g16.png", _grey16, r"is 16-bit greyscale \(mode I;16\), which would load as white"),
        ("i32.tiff", _int32, r"has mode I \(32-bit integer\); convert it to 8-bit RGB"),
        ("f32.tiff", _float32, r"has mode F \(32-bit float\)"),
        ("bw.png", _bilevel, r"has mode 1 \(1-bit\)"),
        ("cmyk.jpg", _cmyk, r"has mode CMYK"),
        ("text.png", _text, r"cannot be read as an image"),
        ("wide.png", _wider, r"is 50x30, but frame_paths\[0\] is 40x30; the frames of a scene"),
    ],
    ids=["missing", "16-bit-grey", "32-bit-int", "float", "1-bit", "cmyk", "not-an-image",
         "wrong-size"],
)
def test_bad_image_fails_when_the_dataset_opens(tmp_path, name, make, pattern):
    if make is not None:
        make(tmp_path / name)
    path = _write(tmp_path, _good(frame_paths=["a.png", name]))
    _refused(path, 2, "frame_paths[1]", pattern)


def test_truncated_image_fails_when_decoded(tmp_path):
    Image.fromarray(_rgb(3, 200, 150)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    K, T = default_camera(200, 150)
    cam = {"K": K.tolist(), "T_cam_from_ego": T.tolist(), "width": 200, "height": 150}
    path = _write(tmp_path, _good(frame_paths=["t.png"], camera=cam))
    _refused(path, 2, "frame_paths[0]", r"\(.*t\.png\) cannot be decoded", at_read=True)


def test_transparent_image_fails_when_decoded(tmp_path):
    rgba = np.dstack([_rgb(4), np.full((H, W), 255, np.uint8)])
    rgba[3, 5, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "t.png")
    path = _write(tmp_path, _good(frame_paths=["a.png", "t.png"]))
    _refused(path, 2, "frame_paths[1]", r"has transparent pixels", at_read=True)


def test_accepted_modes_decode_to_the_same_rgb(tmp_path):
    """Known answers for what decoding converts: grey, palette, opaque alpha, 16-bit RGB."""
    rgb, grey = _rgb(5), _rgb(6)[..., 0]
    Image.fromarray(grey).save(tmp_path / "l.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "l.png")), np.dstack([grey] * 3))
    palette = _rgb(7, 256, 1)[0]  # (256, 3)
    index = _rgb(8)[..., 0]
    p = Image.fromarray(index, mode="P")
    p.putpalette(palette.flatten().tolist())
    p.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "p.png")), palette[index])
    Image.fromarray(np.dstack([rgb, np.full((H, W), 255, np.uint8)])).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "a.png")), rgb)
    Image.fromarray(np.dstack([grey, np.full((H, W), 255, np.uint8)]), mode="LA").save(
        tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "la.png")), np.dstack([grey] * 3))
    deep = np.random.default_rng(9).integers(0, 65536, (H, W, 3)).astype(np.uint16)
    _png16(tmp_path / "rgb16.png", deep)
    np.testing.assert_array_equal(load_image(str(tmp_path / "rgb16.png")), deep >> 8)
    # and through the dataset, every accepted kind in one scene
    path = _write(tmp_path, _good(frame_paths=["l.png", "p.png", "la.png", "rgb16.png"]))
    images = JsonlDataset(path)[1]["images"]
    assert images.shape == (4, H, W, 3) and images.dtype == torch.uint8
    np.testing.assert_array_equal(images[3].numpy(), deep >> 8)


# --------------------------------------------------------------------------- --data_path


def test_data_path_directory_says_so(tmp_path):
    with pytest.raises(DataError, match=rf"^--data_path {tmp_path} is a directory, not a JSONL "
                                        rf"file; did you mean --data_path {tmp_path}/train"
                                        rf"\.jsonl\?$"):
        check_data_file(tmp_path)
    (tmp_path / "val.jsonl").write_text("{}\n")
    (tmp_path / "train.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match=rf"did you mean --data_path {tmp_path}/train\.jsonl "
                                        rf"or --data_path {tmp_path}/val\.jsonl\?"):
        check_data_file(tmp_path)
    with pytest.raises(DataError, match=rf"--eval_data_path {tmp_path}/x\.jsonl: no such file"):
        check_data_file(tmp_path / "x.jsonl", "--eval_data_path")
    assert check_data_file(tmp_path / "val.jsonl") == tmp_path / "val.jsonl"
    with pytest.raises(DataError, match=rf"data file {tmp_path} is a directory"):
        JsonlDataset(tmp_path)


# --------------------------------------------------------------------------- labels


def _reversing(**changes) -> dict:
    """Forward at 5 m/s in the history, then the label backs up at 2 m/s: from 5 to -2 m/s
    in the first 0.1 s step."""
    return _good(trajectory=[[-0.2 * (i + 1), 0.0] for i in range(64)],
                 clean_trajectory=[[-0.2 * (i + 1), 0.0] for i in range(64)], **changes)


def _warnings(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.strip()]


def test_good_labels_give_no_warning(tmp_path, capsys):
    ds = JsonlDataset(_write(tmp_path, _good(), _good()))
    assert ds.out_of_bounds == [] and _warnings(capsys) == []


def test_reversing_label_is_one_warning_line(tmp_path, capsys):
    path = _write(tmp_path, _reversing(sample_id="backing_up"), _good())
    label = torch.tensor(_reversing()["trajectory"])
    history = torch.tensor(_good()["ego_history_xyz"])
    actions = traj_to_action(label[None], history[None])[0]  # what training would target
    assert not action_in_bounds(actions).all() and actions.abs().max() > 40  # bounds ~6 std
    ds = JsonlDataset(path)
    (line,) = _warnings(capsys)
    assert line.startswith(f"warning: {path}: 1 of 3 labels need actions outside the action "
                           f"space's bounds")
    assert f"{path}:2 (backing_up: accel " in line and "they are trained on" in line
    worst = float(re.search(r"accel ([-+][\d.e+]+) std", line).group(1))
    assert worst == pytest.approx(float(actions[..., 0].abs().max()) * np.sign(worst), rel=1e-2)
    assert ds.out_of_bounds == [f"{path}:2"]


def test_many_out_of_bounds_labels_name_the_first_few_and_the_cap(tmp_path, capsys,
                                                                  monkeypatch):
    path = _write(tmp_path, *[_reversing() for _ in range(5)])
    JsonlDataset(path)
    (line,) = _warnings(capsys)
    assert "5 of 6 labels" in line and "and 2 more" in line
    assert len(re.findall(rf"{re.escape(path)}:\d+ \(data:\d+: accel", line)) == 3
    monkeypatch.setattr(label_bounds, "LABEL_CHECK_MAX", 2)
    ds = JsonlDataset(path)
    (line,) = _warnings(capsys)
    assert "2 of 6 labels" in line and "3 more labels passed the finite-difference screen " \
                                         "but were not inverted" in line
    assert len(ds.out_of_bounds) == 2


def test_screen_misses_no_label_the_inverse_puts_out_of_bounds(tmp_path):
    """The finite-difference screen only saves time: on labels perturbed to lie around the
    bounds (braking, turns, speed changes, jitter, reversing), the labels the check reports
    are exactly those whose traj_to_action leaves action_in_bounds."""
    seed = int(np.random.SeedSequence().entropy % (1 << 32))  # fresh each run, reported
    rng = np.random.default_rng(seed)
    records = []
    for i in range(36):
        scene = sample_scene(np.random.default_rng(rng.integers(1 << 30)))
        label, start = scene.clean_trajectory.copy(), int(rng.integers(0, 60))
        kind = i % 6
        if kind == 0:  # stop hard at a random step
            label[start:] = label[start]
        elif kind == 1:  # turn by up to 1.2 rad at a random step
            a = rng.uniform(-1.2, 1.2)
            rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
            label[start:, :2] = label[start, :2] + (label[start:, :2] - label[start, :2]) @ rot
        elif kind == 2:
            label[:, :2] *= rng.uniform(0.3, 2.0)
        elif kind == 3:
            label[:, :2] += rng.normal(0, 0.02, (64, 2))
        elif kind == 4:  # back up from a random step
            label[start:, 0] = label[start, 0] - (label[start:, 0] - label[start, 0]) * 0.3
        records.append({"trajectory": label, "ego_history_xyz": scene.history})
    found, unchecked = label_bounds.out_of_bounds_labels(records)
    future = torch.tensor(np.stack([r["trajectory"] for r in records]))
    history = torch.tensor(np.stack([r["ego_history_xyz"] for r in records]))
    with label_bounds.one_torch_thread():
        exact = ~action_in_bounds(traj_to_action(future, history)).flatten(1).all(-1)
    assert unchecked == 0 and 0 < int(exact.sum()) < len(records), seed
    assert sorted(i for i, _ in found) == torch.nonzero(exact).flatten().tolist(), seed


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """srdrl-make-data output and a tiny policy saved where srdrl-eval expects one."""
    from srdrl.data.synthetic import main as make_data
    from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer

    root = tmp_path_factory.mktemp("generated")
    make_data(["--output_dir", str(root / "data"), "--num_scenes", "6", "--width", "64",
               "--height", "48", "--frames", "2", "--seed", "3"])
    lines = (root / "data" / "train.jsonl").read_text().splitlines()
    texts = [json.loads(x)["reasoning"] for x in lines]
    torch.manual_seed(0)
    config = PolicyConfig.tiny()
    VLAPolicy(config, build_tokenizer(config, texts)).save_pretrained(root / "policy")
    return root


def _corrupt(generated, tmp_path, change) -> str:
    lines = (generated / "data" / "train.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    for r in records:
        r["frame_paths"] = [str(generated / "data" / p) for p in r["frame_paths"]]
    change(records[2])
    path = tmp_path / "corrupt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_srdrl_eval_on_a_corrupted_file_is_one_line_and_exit_2(generated, tmp_path):
    path = _corrupt(generated, tmp_path, lambda r: r["trajectory"][4].__setitem__(1, 1e30))
    done = subprocess.run(
        [sys.executable, "-m", "srdrl.evaluate", "--policy", str(generated / "policy"),
         "--data_path", path, "--train_data_path", "none", "--pictures", "0"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line == (f"srdrl-eval: error: {path}:3: field 'trajectory' row 4: |y| = 1e+30 m is "
                    f"past the 1000 m limit")


def test_srdrl_eval_main_on_a_zero_camera(generated, tmp_path, capsys):
    from srdrl.evaluate import main

    path = _corrupt(generated, tmp_path, lambda r: r["camera"].__setitem__("K", [[0] * 3] * 3))
    with pytest.raises(SystemExit) as e:
        main(["--policy", str(generated / "policy"), "--data_path", path,
              "--train_data_path", "none"])
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"srdrl-eval: error: {path}:3: field 'camera.K' is all zeros"


# --------------------------------------------------------------------------- reward settings


@pytest.mark.parametrize(
    "field, value, pattern",
    [
        ("unsafe_threshold", 7.0, r"unsafe_threshold is a path-safety score, in \[0, 1\]; got 7"),
        ("unsafe_threshold", -0.1, r"unsafe_threshold .* got -0.1"),
        ("unsafe_threshold", float("nan"), r"unsafe_threshold .* got nan"),
        ("danger_threshold", float("nan"), r"danger_threshold is a danger confidence"),
        ("neutral_alignment", 1.5, r"neutral_alignment is an alignment score"),
        ("gt_trust_max", 1.5, r"gt_trust_min <= gt_trust_max <= 1"),
        ("gt_trust_min", float("nan"), r"gt_trust_min <= gt_trust_max"),
        ("safety_reward_weight", float("nan"), r"safety_reward_weight must be a finite"),
        ("gt_reward_weight", float("inf"), r"gt_reward_weight must be a finite number >= 0"),
        ("reasoning_reward_weight", -1.0, r"reasoning_reward_weight must be"),
        ("gt_sim_scale", 0.0, r"gt_sim_scale must be a finite number > 0"),
        ("texture_scale", float("inf"), r"texture_scale must be a finite number > 0"),
        ("colour_scale", float("nan"), r"colour_scale must be"),
        ("safety_patch_size", 0, r"safety_patch_size must be an integer >= 1"),
        ("safety_patch_size", 2.5, r"safety_patch_size must be an integer"),
    ],
    ids=lambda v: str(v),
)
def test_reward_settings_out_of_range(field, value, pattern):
    from srdrl.config import RewardConfig

    with pytest.raises(ValueError, match=pattern):
        RewardConfig(**{field: value})


def test_reward_settings_at_their_limits_pass_and_the_flag_is_a_usage_error(capsys):
    from srdrl.config import RewardConfig
    from srdrl.evaluate import parse_args

    for value in (0.0, 1.0):
        RewardConfig(unsafe_threshold=value, danger_threshold=value, neutral_alignment=value,
                     gt_trust_min=value, gt_trust_max=1.0)
    RewardConfig(safety_reward_weight=0.0, gt_reward_weight=0.0, reasoning_reward_weight=0.0)
    with pytest.raises(SystemExit) as e:
        parse_args(["--policy", "p", "--data_path", "d", "--unsafe_threshold", "7"])
    assert e.value.code == 2 and "unsafe_threshold is a path-safety score" in \
        capsys.readouterr().err
