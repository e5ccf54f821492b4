"""Synthetic scenes, the JSONL dataset and its error messages."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from srdrl.camera import default_camera, project_points
from srdrl.data.dataset import DataError, JsonlDataset, collate, read_jsonl, scored_images
from srdrl.data.render import TERRAIN, render_frame
from srdrl.data.scenes import (
    Hazard,
    centreline_history,
    constant_speed_trajectory,
    sample_scene,
)
from srdrl.data.synthetic import SyntheticDataConfig, main, make_dataset, synthetic_camera
from srdrl.footprint import VEHICLE_HALF_WIDTH, footprint_crosses


def _make(tmp_path, name="d", **kw):
    cfg = SyntheticDataConfig(output_dir=str(tmp_path / name), **{"num_scenes": 8, "width": 64,
                                                             "height": 48, **kw})
    make_dataset(cfg, progress=False)
    return tmp_path / name


def test_generator_is_deterministic_for_any_worker_count(tmp_path):
    a = _make(tmp_path, "a", seed=3, frames=2, workers=1)
    b = _make(tmp_path, "b", seed=3, frames=2, workers=3)
    c = _make(tmp_path, "c", seed=4, frames=2)
    for split in ("train", "val"):
        assert (a / f"{split}.jsonl").read_text() == (b / f"{split}.jsonl").read_text()
    assert (a / "train.jsonl").read_text() != (c / "train.jsonl").read_text()
    for png in (a / "frames").iterdir():
        assert png.read_bytes() == (b / "frames" / png.name).read_bytes()
    lines = (a / "train.jsonl").read_text().splitlines()
    assert len(lines) + len((a / "val.jsonl").read_text().splitlines()) == 8
    rec = json.loads(lines[0])
    assert len(rec["frame_paths"]) == 2 and np.array(rec["trajectory"]).shape == (64, 3)


def test_noise_levels_share_scenes(tmp_path):
    clean = [json.loads(x) for x in (_make(tmp_path, "n0", num_scenes=60, label_noise=0.0)
                                     / "train.jsonl").read_text().splitlines()]
    noisy = [json.loads(x) for x in (_make(tmp_path, "n1", num_scenes=60, label_noise=1.0)
                                     / "train.jsonl").read_text().splitlines()]
    assert not any(r["label_noisy"] for r in clean)
    assert all(r["trajectory"] == r["clean_trajectory"] for r in clean)
    n_noisy = 0
    for r0, r1 in zip(clean, noisy, strict=True):
        assert r0["clean_trajectory"] == r1["clean_trajectory"]
        assert r0["reasoning"] == r1["reasoning"]
        in_path = any(h["in_path"] for h in r1["hazards"])
        assert r1["label_noisy"] == in_path  # with P = 1 exactly the eligible scenes are noisy
        n_noisy += r1["label_noisy"]
    assert 0 < n_noisy < len(noisy)


def test_clean_paths_avoid_hazards_and_noisy_ones_cross():
    kinds, intents = set(), set()
    for i in range(400):
        scene = sample_scene(np.random.default_rng([7, i]))
        intents.add(scene.intent)
        for h in scene.hazards:
            kinds.add(h.kind)
            assert not footprint_crosses(scene.clean_trajectory, h.footprint()), (i, h)
            if h.in_path:
                assert footprint_crosses(scene.noisy_trajectory, h.footprint()), (i, h)
    assert kinds == {"mud", "rocks", "water"}
    assert intents == {"straight", "left", "right", "stop"}


def test_footprint_crossing_geometry():
    square = np.array([[10.0, -1], [12, -1], [12, 1], [10, 1]])
    straight = constant_speed_trajectory(5.0, 0.0)
    assert footprint_crosses(straight, square)
    beside = straight.copy()
    beside[:, 1] = 1.0 + VEHICLE_HALF_WIDTH + 0.05
    assert not footprint_crosses(beside, square)
    beside[:, 1] = 1.0 + VEHICLE_HALF_WIDTH - 0.05  # the vehicle's edge grazes the square
    assert footprint_crosses(beside, square)


@pytest.mark.parametrize("kind", ["mud", "rocks", "water"])
def test_hazard_appears_where_the_camera_projects_it(kind):
    scene = sample_scene(np.random.default_rng(0))
    scene.hazards = [Hazard(kind, (10.0, 0.0), (2.0, 2.0), (0.0, 0.0), True)]
    scene.curvature, scene.palette_jitter, scene.colour_gain = 0.0, np.zeros(3), 1.0
    K, T = default_camera(320, 192)
    img = render_frame(scene, K.numpy(), T.numpy(), 320, 192, np.random.default_rng(1))
    inside = torch.tensor([[10.0, 0.0, 0.0], [9.0, 0.8, 0.0], [11.0, -1.0, 0.0]])
    outside = torch.tensor([[5.0, 0.0, 0.0], [16.0, 0.0, 0.0]])  # on the track, not hazard
    for pts, want in ((inside, TERRAIN[kind][0]), (outside, TERRAIN["track"][0])):
        uv, _ = project_points(pts.double(), K, T)
        for u, v in torch.floor(uv + 0.5).long().tolist():
            window = img[v - 1 : v + 2, u - 2 : u + 3].reshape(-1, 3).astype(float)
            assert np.abs(window.mean(0) - want).max() < 20, (kind, u, v, window.mean(0))
    # hazards differ from the track in Laplacian texture or in colour, as real ones do
    gap = np.linalg.norm(TERRAIN[kind][0] - TERRAIN["track"][0])
    assert gap > 60 or TERRAIN[kind][1] > 3 * TERRAIN["track"][1]


def test_history_and_trajectories_are_kinematic():
    for i in range(100):
        s = sample_scene(np.random.default_rng([1, i]))
        assert s.history.shape == (16, 3) and np.allclose(s.history[-1], 0)
        v_hist = np.linalg.norm(s.history[-1, :2] - s.history[-2, :2]) / 0.1
        assert 3.0 <= v_hist <= 8.0 + 1e-9
        p = np.concatenate([s.history[-2:, :2], s.clean_trajectory[:, :2]])
        acc = np.diff(p, 2, axis=0) / 0.01
        assert np.abs(acc).max() < 3.5  # m/s^2, braking and lateral
    np.testing.assert_allclose(centreline_history(5.0, 0.0)[:, 0], -0.5 * np.arange(15, -1, -1))


# --------------------------------------------------------------------------- dataset


def test_dataset_reads_generated_data(tmp_path):
    root = _make(tmp_path, frames=2)
    ds = JsonlDataset(root / "train.jsonl")
    item = ds[0]
    assert item["images"].shape == (2, 48, 64, 3) and item["images"].dtype == torch.uint8
    assert item["trajectory"].shape == (64, 3) and item["ego_history_xyz"].shape == (16, 3)
    assert isinstance(item["reasoning_text"], str) and "label_noisy" in item["eval"]
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["images"].shape == (3, 2, 48, 64, 3)
    assert batch["K"].shape == (3, 3, 3) and batch["T_cam_from_ego"].shape == (3, 4, 4)
    assert isinstance(batch["reasoning_text"], list) and len(batch["reasoning_text"]) == 3
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    assert next(iter(loader))["trajectory"].shape == (2, 64, 3)


def _write(tmp_path, records, image_size=(40, 30)):
    img = np.random.default_rng(0).integers(0, 256, (image_size[1], image_size[0], 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "f.png")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def _good(**kw):
    traj = [[0.5 * (i + 1), 0.0] for i in range(64)]
    return {"frame_paths": ["f.png"], "reasoning": "Clear track; keep straight.",
            "trajectory": traj, **kw}


def test_minimal_record_defaults(tmp_path):
    ds = JsonlDataset(_write(tmp_path, [_good()]))
    item = ds[0]
    assert torch.all(item["trajectory"][:, 2] == 0)  # 64x2 gets z = 0
    K, T = default_camera(40, 30)
    torch.testing.assert_close(item["K"], K.float())
    torch.testing.assert_close(item["T_cam_from_ego"], T.float())
    hist = item["ego_history_xyz"]
    assert torch.allclose(hist[-1], torch.zeros(3))
    assert math.isclose(float(hist[-1, 0] - hist[-2, 0]), 0.5, rel_tol=1e-6)  # 5 m/s
    assert item["sample_id"] == "data:1"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"frame_paths": ["f.png"], "reasoning": "x", ', r"data\.jsonl:2: malformed JSON"),
        ('[1, 2]', r"data\.jsonl:2: a line must hold a JSON object"),
        (_good(trajectory=[[0.0, 0.0]] * 63), r"data\.jsonl:2: field 'trajectory' has shape"),
        (_good(trajectory=[[float("nan"), 0.0]] * 64), r"data\.jsonl:2: .*NaN or inf"),
        (_good(trajectory=[[1e400, 0.0]] * 64), r"data\.jsonl:2: .*NaN or inf"),
        (_good(ego_history_xyz=[[0.0, 0.0, 0.0]] * 15), r"data\.jsonl:2: field 'ego_history"),
        ({"frame_paths": ["f.png"], "trajectory": [[0, 0]] * 64},
         r"data\.jsonl:2: missing required field 'reasoning'"),
        (_good(camera={"K": [[1, 0, 0]]}), r"data\.jsonl:2: field 'camera.T_cam_from_ego' is "
                                           r"missing"),
    ],
    ids=["malformed", "not-object", "short", "nan", "inf", "history", "missing", "camera"],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path, [_good(), line])
    with pytest.raises(DataError, match=message):
        JsonlDataset(path)


def test_missing_image_fails_when_the_dataset_opens(tmp_path):
    with pytest.raises(DataError, match=r"data\.jsonl:1: field 'frame_paths\[0\]' "
                                        r"\(.*nowhere/x\.png\) does not exist"):
        JsonlDataset(_write(tmp_path, [_good(frame_paths=["nowhere/x.png"])]))


def test_image_size_must_match_camera(tmp_path):
    K, T = default_camera(64, 48)
    cam = {"K": K.tolist(), "T_cam_from_ego": T.tolist(), "width": 64, "height": 48}
    with pytest.raises(DataError, match=r"data\.jsonl:1: field 'camera.width'/'camera.height' "
                                        r"say 64x48, but the scored image is 40x30"):
        JsonlDataset(_write(tmp_path, [_good(camera=cam)], image_size=(40, 30)))


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="none.jsonl: no such file"):
        read_jsonl(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(tmp_path / "e.jsonl")


def test_generated_data_passes_the_checks_with_its_camera(tmp_path):
    """srdrl-make-data's own output opens, and its camera is the one the renderer used."""
    root = _make(tmp_path, num_scenes=12, frames=2)
    ds = JsonlDataset(root / "train.jsonl")
    assert all(r["camera"]["width"] == 64 and r["camera"]["height"] == 48 for r in ds.records)
    K, T = (torch.from_numpy(m) for m in synthetic_camera(SyntheticDataConfig(
        output_dir="", width=64, height=48)))
    torch.testing.assert_close(ds[0]["K"], K.float(), atol=1e-4, rtol=0)  # rounded to 4 places
    torch.testing.assert_close(ds[0]["T_cam_from_ego"], T.float(), atol=1e-4, rtol=0)


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path), "--label_noise", "1.5"])
    assert "label_noise" in capsys.readouterr().err
    main(["--output_dir", str(tmp_path / "ok"), "--num_scenes", "3", "--width", "32",
          "--height", "24"])
    assert (tmp_path / "ok" / "train.jsonl").is_file()


def _write_original_layout(tmp_path, frame_size=(40, 30), scoring_size=(80, 60), **kw):
    """A line as the original SRD-RL script wrote them: four frames, then the scoring image;
    no history, no camera; the label at 8 m/s."""
    rng = np.random.default_rng(1)
    names = []
    for k, size in enumerate([frame_size] * 4 + [scoring_size]):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(
            tmp_path / f"o{k}.png")
        names.append(f"o{k}.png")
    record = {"frame_paths": names, "reasoning": "Mud ahead on the left; steer right.",
              "trajectory": [[0.8 * (i + 1), 0.0] for i in range(64)], **kw}
    path = tmp_path / "original.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return path


def test_original_script_layout_frames_then_scoring_image(tmp_path):
    path = _write_original_layout(tmp_path)
    item = JsonlDataset(path, "frames_then_scoring_image")[0]
    assert item["images"].shape == (4, 30, 40, 3)
    scoring = np.asarray(Image.open(tmp_path / "o4.png"))
    assert np.array_equal(scored_images(item).numpy(), scoring)  # (60, 80, 3), not a frame
    K, T = default_camera(80, 60)  # the camera belongs to the scored image
    torch.testing.assert_close(item["K"], K.float())
    hist = item["ego_history_xyz"]  # the original's synthetic history: 5 m/s, not the label's 8
    assert torch.allclose(hist[:, 1:], torch.zeros(16, 2))
    torch.testing.assert_close(hist[1:, 0] - hist[:-1, 0], torch.full((15,), 0.5))
    batch = collate([item, item])
    assert scored_images(batch).shape == (2, 60, 80, 3)
    # read as srdrl's own layout the same line is five frames of two sizes: refused
    with pytest.raises(DataError, match=r"original\.jsonl:1: field 'frame_paths\[4\]' .* is "
                                        r"80x60, but frame_paths\[0\] is 40x30"):
        JsonlDataset(path)


def test_scored_image_is_the_last_frame_in_srdrl_layout(tmp_path):
    item = JsonlDataset(_write_original_layout(tmp_path, scoring_size=(40, 30)))[0]
    assert item["images"].shape == (5, 30, 40, 3) and "scoring_image" not in item
    assert torch.equal(scored_images(item), item["images"][-1])
    assert torch.equal(scored_images(collate([item]))[0], item["images"][-1])


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"frame_paths": ["o0.png"]}, r"original\.jsonl:1: field 'frame_paths' must hold at "
                                      r"least one frame and then the scoring image"),
        ({"camera": "default40x30"}, r"original\.jsonl:1: field 'camera.width'/'camera.height' "
                                     r"say 40x30, but the scored image is 80x60"),
    ],
)
def test_original_layout_errors_name_line_and_field(tmp_path, kw, message):
    if kw.get("camera") == "default40x30":
        K, T = default_camera(40, 30)
        kw = {"camera": {"K": K.tolist(), "T_cam_from_ego": T.tolist(), "width": 40,
                         "height": 30}}
    with pytest.raises(DataError, match=message):
        JsonlDataset(_write_original_layout(tmp_path, **kw), "frames_then_scoring_image")


def test_unknown_frame_paths_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="frame_paths_layout must be one of frames, "
                                         "frames_then_scoring_image, got 'scoring_first'"):
        JsonlDataset(_write_original_layout(tmp_path), "scoring_first")


def test_collate_of_different_image_sizes_names_file_and_line(tmp_path):
    for name, size in (("a.png", (40, 30)), ("b.png", (64, 48))):
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8) + 90).save(tmp_path / name)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(_good(frame_paths=[f])) for f in ("a.png", "b.png")))
    ds = JsonlDataset(path)
    with pytest.raises(DataError, match=r"data\.jsonl:2: field 'frame_paths' gives images of "
                                        r"shape \(1, 48, 64, 3\), but .*data\.jsonl:1 in the "
                                        r"same batch has \(1, 30, 40, 3\)"):
        collate([ds[0], ds[1]])
