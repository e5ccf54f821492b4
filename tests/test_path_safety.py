"""Path-safety backends (Kornia, Triton) against the OpenCV reference loop.

Scenes are fresh random textured images; waypoints are placed by choosing pixel positions
(corners, borders, off the image, behind and too close to the camera, random) and lifting
them to ego-frame points, with every coordinate kept at least 0.05 px from a rounding or
visibility boundary so that float32 trajectories and float64 association order cannot
flip a pixel. Without CUDA, Triton runs through its interpreter (tests/conftest.py), so
its cases are kept small.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srdrl.camera import default_camera, project_points, visible
from srdrl.kernels import PathSafety, path_safety
from srdrl.kernels.path_safety_kornia import path_safety_kornia, reflect101, rgb_to_gray_opencv
from srdrl.kernels.path_safety_triton import allocate_outputs, path_safety_triton
from srdrl.kernels.reference import path_safety_reference, reference_colour

cv2 = pytest.importorskip("cv2")

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


# ---------------------------------------------------------------------------- scenes


def textured_images(B: int, H: int, W: int, rng: np.random.Generator) -> torch.Tensor:
    """(B, H, W, 3) uint8 in 1..254: smooth waves, a strongly noisy band, faint noise."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    images = np.empty((B, H, W, 3))
    for b in range(B):
        for ch in range(3):
            phase = rng.uniform(0, 2 * np.pi, size=2)
            images[b, ..., ch] = 120 + 60 * np.sin(x / 6 + phase[0]) * np.cos(y / 4 + phase[1])
        images[b] += rng.normal(0, 2, size=(H, W, 3))
        c0, c1 = sorted(rng.integers(0, W + 1, size=2))
        images[b, :, c0:c1] += rng.uniform(-80, 80, size=(H, c1 - c0, 3))
    return torch.from_numpy(np.clip(np.rint(images), 1, 254).astype(np.uint8))


def away_from_boundaries(coord: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Replace the fractional part by one 0.05..0.45 away from .0 and .5."""
    frac = rng.uniform(0.05, 0.45, size=coord.shape) + 0.5 * rng.integers(0, 2, coord.shape)
    return np.floor(coord) + frac


def special_pixels(H: int, W: int) -> list[tuple[float, float, float]]:
    """(u, v, camera depth): corners, border midpoints, just off the image, behind."""
    mu, mv = W // 2 + 0.1, H // 2 + 0.1
    return [
        (0.1, 0.2, 7.0), (W - 0.3, 0.1, 9.0), (0.2, H - 0.35, 4.0), (W - 0.15, H - 0.4, 5.0),
        (mu, 0.3, 6.0), (mu, H - 0.3, 3.0), (0.3, mv, 8.0), (W - 0.3, mv, 12.0),
        (-0.3, mv, 5.0), (W + 0.2, mv, 5.0), (mu, -0.2, 5.0), (mu, H + 0.3, 5.0),
        (-40.2, -30.3, 5.0), (mu, mv, -4.0), (mu, mv, 0.05),
    ]  # fmt: skip


def ego_points_at_pixels(uv, depth, K, T_cam_from_ego):
    """Ego-frame points (..., 3) that project to ``uv`` (..., 2) at camera depth ``depth``."""
    rays = torch.cat([uv, torch.ones_like(uv[..., :1])], -1) @ torch.linalg.inv(K).T
    cam = rays * depth[..., None]
    R, t = T_cam_from_ego[:3, :3], T_cam_from_ego[:3, 3]
    return (cam - t) @ R  # R^T (cam - t), row vectors


def make_scenes(B, N, T, H, W, seed, specials=True, blind_candidate=True):
    """Images, float32 trajectories and per-scene cameras; candidate (0, 0) sees nothing."""
    rng = np.random.default_rng(seed)
    images = textured_images(B, H, W, rng)
    Ks, Ts, trajectories = [], [], []
    for b in range(B):
        K, T_ce = default_camera(W, H, hfov_deg=80.0 + 7 * b, pitch_deg=4.0 + 3 * b)
        u = away_from_boundaries(rng.uniform(-0.1 * W, 1.1 * W, N * T), rng)
        v = away_from_boundaries(rng.uniform(-0.1 * H, 1.1 * H, N * T), rng)
        depth = rng.uniform(2.0, 40.0, N * T)
        pixels = np.stack([u, v, depth], -1)
        if specials:
            chosen = np.array(special_pixels(H, W))[: N * T]
            pixels[rng.permutation(N * T)[: len(chosen)]] = chosen
        pixels = pixels.reshape(N, T, 3)
        if blind_candidate and b == 0:
            pixels[0, :, 2] = -3.0  # every waypoint behind the camera
        pix = torch.from_numpy(pixels)
        trajectories.append(ego_points_at_pixels(pix[..., :2], pix[..., 2], K, T_ce))
        Ks.append(K)
        Ts.append(T_ce)
    return dict(
        images=images,
        trajectories=torch.stack(trajectories).to(torch.float32),  # (B, N, T, 3)
        K=torch.stack(Ks),  # (B, 3, 3) float64
        T_cam_from_ego=torch.stack(Ts),  # (B, 4, 4) float64
    )


# ------------------------------------------------------------------------ comparison


def triton_device() -> str:
    return "cpu" if INTERPRETED or not HAS_CUDA else "cuda"


def run_backend(backend: str, scenes: dict, expected: PathSafety, **kwargs) -> PathSafety:
    """Run one backend; Triton writes into outputs poisoned so that any unwritten element
    fails the comparison (NaN scores, visibility the opposite of the expected one)."""
    if backend != "triton":
        return path_safety(**scenes, backend=backend, **kwargs)
    device = triton_device()
    scenes = {k: v.to(device) for k, v in scenes.items()}
    B, N, T = scenes["trajectories"].shape[:3]
    out = allocate_outputs(B, N, T, device)
    for x in out[:3]:
        x.fill_(float("nan"))
    out.visible.copy_(~expected.visible)
    if "ref_rgb" in kwargs and kwargs["ref_rgb"] is not None:
        kwargs["ref_rgb"] = kwargs["ref_rgb"].to(device)
    result = path_safety_triton(**scenes, **kwargs, out=out)
    assert all(a is b for a, b in zip(result, out, strict=True))
    return result


def assert_matches(result: PathSafety, expected: PathSafety) -> None:
    B, N, T = expected.variance.shape
    assert result.safety.shape == (B, N) and result.safety.dtype == torch.float32
    for x in (result.variance, result.colour_distance):
        assert x.shape == (B, N, T) and x.dtype == torch.float32
    assert result.visible.dtype == torch.bool
    result = PathSafety(*(x.cpu() for x in result))
    assert torch.equal(result.visible, expected.visible.cpu())
    close = torch.testing.assert_close
    close(result.variance.double(), expected.variance, rtol=1e-4, atol=1e-3)
    close(result.colour_distance.double(), expected.colour_distance, rtol=0, atol=1e-5)
    close(result.safety.double(), expected.safety, rtol=0, atol=2e-5)


def reference(scenes: dict, **kwargs) -> PathSafety:
    return path_safety_reference(**scenes, **kwargs)


# ----------------------------------------------------------------------------- tests


def test_gray_matches_opencv_on_every_colour():
    levels = np.arange(256, dtype=np.uint8)
    rgb = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(4096, 4096, 3)
    for rows in np.array_split(np.arange(4096), 4):
        expected = cv2.cvtColor(rgb[rows], cv2.COLOR_RGB2GRAY)
        got = rgb_to_gray_opencv(torch.from_numpy(rgb[rows])).numpy()
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("length", [1, 2, 3, 7])
def test_reflect101_matches_opencv(length):
    index = torch.arange(-1, length + 1)
    got = reflect101(index, torch.tensor(length))
    expected = [cv2.borderInterpolate(int(i), length, cv2.BORDER_REFLECT_101) for i in index]
    assert got.tolist() == expected


def test_scenes_cover_the_cases():
    scenes = make_scenes(2, 3, 16, 37, 53, seed=0)
    uv, z = project_points(scenes["trajectories"].double(), scenes["K"], scenes["T_cam_from_ego"])
    vis = visible(uv, z, 53, 37)
    assert not vis[0, 0].any() and vis.any()
    assert ((z > 0.1) & ~vis).any() and (z < 0).any() and ((z > 0) & (z <= 0.1)).any()
    frac = torch.frac(uv[vis] + 0.5)
    assert ((frac > 1e-3) & (frac < 1 - 1e-3)).all()  # no rounding ties


@pytest.mark.parametrize("patch_size", [1, 2, 31, 32])
@pytest.mark.parametrize("size", [(37, 53), (192, 320)], ids=["37x53", "192x320"])
@pytest.mark.parametrize("backend", ["kornia", "triton"])
def test_backend_matches_reference(backend, size, patch_size):
    H, W = size
    T = 24 if backend == "kornia" else 10
    scenes = make_scenes(2, 3, T, H, W, seed=hash((H, patch_size)) % 1000)
    kwargs = dict(patch_size=patch_size, texture_scale=60000.0, colour_scale=0.3)
    expected = reference(scenes, **kwargs)
    assert_matches(run_backend(backend, scenes, expected, **kwargs), expected)


@pytest.mark.parametrize("backend", ["kornia", "triton", "reference"])
def test_single_scene_single_candidate_default_scales(backend):
    scenes = make_scenes(1, 1, 15, 37, 53, seed=5, blind_candidate=False)
    expected = reference(scenes)
    assert_matches(run_backend(backend, scenes, expected), expected)


@pytest.mark.parametrize("backend", ["kornia", "triton"])
def test_given_reference_colour(backend):
    scenes = make_scenes(2, 2, 6, 37, 53, seed=6)
    ref_rgb = torch.tensor([[10.0, 200.0, 30.0], [250.0, 0.5, 128.0]])
    expected = reference(scenes, ref_rgb=ref_rgb, patch_size=5)
    assert_matches(run_backend(backend, scenes, expected, ref_rgb=ref_rgb, patch_size=5), expected)


@pytest.mark.parametrize("interior_fast_path", [True, False], ids=["fast", "masked"])
@pytest.mark.parametrize("patch_size", [3, 8])
def test_triton_interior_and_clipped_crops(interior_fast_path, patch_size):
    # Both row walks of the patch kernel against the reference, on scenes that hold crops
    # wholly inside the image (the unmasked walk) and crops clipped by every border.
    scenes = make_scenes(2, 3, 12, 40, 60, seed=21 + patch_size)
    uv, z = project_points(scenes["trajectories"].double(), scenes["K"],
                           scenes["T_cam_from_ego"])
    centre = torch.floor(uv + 0.5)
    half = patch_size // 2
    inside = ((centre - half >= 0).all(-1) & (centre[..., 0] - half + patch_size <= 60)
              & (centre[..., 1] - half + patch_size <= 40) & visible(uv, z, 60, 40))
    assert inside.sum() >= 10 and (visible(uv, z, 60, 40) & ~inside).sum() >= 10
    expected = reference(scenes, patch_size=patch_size, texture_scale=3000.0)
    assert_matches(run_backend("triton", scenes, expected, patch_size=patch_size,
                               texture_scale=3000.0, interior_fast_path=interior_fast_path),
                   expected)


def test_triton_reference_colour_from_several_row_groups():
    # 100x700: the bottom-centre region (20 x 140 px) is summed by 3 tiles per scene of
    # 7, 7 and 6 rows, each row in two column chunks (128 + 12): masked rows and columns.
    scenes = make_scenes(2, 1, 5, 100, 700, seed=16, specials=False, blind_candidate=False)
    expected = reference(scenes, patch_size=5)
    assert_matches(run_backend("triton", scenes, expected, patch_size=5), expected)


def test_reference_semantics():
    scenes = make_scenes(2, 2, 15, 37, 53, seed=7)
    result = reference(scenes)
    assert result.safety[0, 0] == 0.5  # nothing visible: neutral
    assert (result.variance[~result.visible] == 0).all()
    assert (result.colour_distance[~result.visible] == 0).all()
    images = scenes["images"]
    region = images[:, int(0.8 * 37) :, int(0.4 * 53) : int(0.6 * 53)].double()
    torch.testing.assert_close(reference_colour(images), region.mean(dim=(1, 2)))


def test_kornia_chunks_agree():
    scenes = make_scenes(2, 2, 9, 37, 53, seed=8)
    whole = path_safety_kornia(**scenes)
    chunked = path_safety_kornia(**scenes, chunk_patches=7)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["kornia", "triton", "reference"])
def test_empty_waypoints(backend):
    scenes = make_scenes(2, 3, 1, 37, 53, seed=9)
    scenes["trajectories"] = scenes["trajectories"][:, :, :0]
    if backend == "triton":
        scenes = {k: v.to(triton_device()) for k, v in scenes.items()}
    result = path_safety(**scenes, backend=backend)
    assert result.variance.shape == (2, 3, 0)
    assert (result.safety == 0.5).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in
@pytest.mark.parametrize("backend", ["kornia", "triton"])
def test_unchecked_non_finite_points_are_invisible(backend):
    scenes = make_scenes(1, 2, 4, 37, 53, seed=10, blind_candidate=False)
    scenes["trajectories"][0, 0, 1] = float("nan")
    scenes["trajectories"][0, 1, 2, 0] = float("inf")
    if backend == "triton":
        scenes = {k: v.to(triton_device()) for k, v in scenes.items()}
    result = path_safety(**scenes, backend=backend, check_finite=False)
    assert not result.visible[0, 0, 1] and not result.visible[0, 1, 2]
    assert torch.isfinite(result.safety).all() and torch.isfinite(result.variance).all()


def test_auto_backend_and_public_dtypes():
    scenes = make_scenes(1, 2, 5, 37, 53, seed=11)
    auto = path_safety(**scenes)
    for backend in ("kornia", "reference"):
        other = path_safety(**scenes, backend=backend)
        assert [x.dtype for x in other] == [x.dtype for x in auto]
        torch.testing.assert_close(other.safety, auto.safety, rtol=0, atol=2e-5)


@st.composite
def small_problems(draw):
    H, W = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    B, N, T = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 5))
    patch_size = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    specials = draw(st.booleans())
    return make_scenes(B, N, T, H, W, seed, specials=specials), patch_size


def _property(backend, problem):
    scenes, patch_size = problem
    kwargs = dict(patch_size=patch_size, texture_scale=40000.0)
    expected = reference(scenes, **kwargs)
    assert_matches(run_backend(backend, scenes, expected, **kwargs), expected)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_property_kornia(problem):
    _property("kornia", problem)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_property_triton(problem):
    _property("triton", problem)


def _bad(name, value):
    def mutate(kw):
        kw[name] = value(kw) if callable(value) else value

    return mutate


BAD_INPUTS = {
    "images-float": (_bad("images", lambda kw: kw["images"].float()), TypeError, "uint8"),
    "images-rank3": (_bad("images", lambda kw: kw["images"][0]), ValueError, "rank 4"),
    "images-rgba": (_bad("images", lambda kw: torch.cat([kw["images"]] * 2, -1)[..., :4]),
                    ValueError, "RGB"),
    "images-list": (_bad("images", lambda kw: kw["images"].tolist()), TypeError, "Tensor"),
    "traj-int": (_bad("trajectories", lambda kw: kw["trajectories"].long()), TypeError,
                 "float32"),
    "traj-2d-points": (_bad("trajectories", lambda kw: kw["trajectories"][..., :2]),
                       ValueError, r"\(B, N, T, 3\)"),
    "traj-batch": (_bad("trajectories", lambda kw: kw["trajectories"][:1]), ValueError,
                   "trajectories has batch size 1"),
    "K-batch": (_bad("K", lambda kw: kw["K"][:1]), ValueError, "K has batch size 1"),
    "K-shape": (_bad("K", lambda kw: kw["T_cam_from_ego"][:, :3]), ValueError, r"\(B, 3, 3\)"),
    "T-batch": (_bad("T_cam_from_ego", lambda kw: kw["T_cam_from_ego"][:1]), ValueError,
                "T_cam_from_ego has batch size 1"),
    "T-rank": (_bad("T_cam_from_ego", lambda kw: kw["T_cam_from_ego"][0]), ValueError, "rank 3"),
    "traj-nan": (_bad("trajectories", lambda kw: kw["trajectories"].index_fill(2, torch.tensor(1),
                 float("nan"))), ValueError, "non-finite"),
    "traj-inf": (_bad("trajectories", lambda kw: kw["trajectories"].index_fill(1, torch.tensor(0),
                 float("inf"))), ValueError, "non-finite"),
    "patch-0": (_bad("patch_size", 0), ValueError, "patch_size must be >= 1"),
    "patch-float": (_bad("patch_size", 2.5), TypeError, "patch_size must be an int"),
    "backend": (_bad("backend", "cuda"), ValueError, "backend must be one of"),
    "ref-shape": (_bad("ref_rgb", torch.zeros(3)), ValueError, "rank 2"),
    "ref-batch": (_bad("ref_rgb", torch.zeros(1, 3)), ValueError, r"ref_rgb must be \(B, 3\)"),
    "texture-scale": (_bad("texture_scale", 0.0), ValueError, "texture_scale"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise(case):
    mutate, error, match = case
    kwargs = make_scenes(2, 2, 3, 37, 53, seed=12)
    mutate(kwargs)
    with pytest.raises(error, match=match):
        path_safety(**kwargs)


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    scenes = make_scenes(1, 1, 2, 37, 53, seed=17)
    with pytest.raises(ValueError, match="needs CUDA"):
        path_safety(**scenes, backend="triton")


# ---------------------------------------------------------------------- GPU only


@gpu
@needs_cuda
@pytest.mark.parametrize("patch_size", [1, 2, 31, 32, 45])
@pytest.mark.parametrize("backend", ["triton", "kornia"])
def test_cuda_matches_reference(backend, patch_size):
    scenes = make_scenes(3, 4, 64, 192, 320, seed=13)
    expected = reference(scenes, patch_size=patch_size, texture_scale=60000.0)
    cuda = {k: v.cuda() for k, v in scenes.items()}
    result = path_safety(**cuda, patch_size=patch_size, texture_scale=60000.0, backend=backend)
    assert result.safety.is_cuda
    assert_matches(result, expected)


@gpu
@needs_cuda
@pytest.mark.parametrize("patch_size", [3, 32, 45])
def test_cuda_masked_walk_matches_reference(patch_size):
    # every crop on the masked walk, compiled (the default call sends interior crops to the
    # unmasked one, which test_cuda_matches_reference covers)
    scenes = make_scenes(3, 4, 64, 192, 320, seed=17)
    expected = reference(scenes, patch_size=patch_size, texture_scale=60000.0)
    cuda = {k: v.cuda() for k, v in scenes.items()}
    assert_matches(path_safety_triton(**cuda, patch_size=patch_size, texture_scale=60000.0,
                                      interior_fast_path=False), expected)


@gpu
@needs_cuda
def test_cuda_graph_capture_and_replay():
    first = make_scenes(2, 4, 64, 192, 320, seed=14)
    second = make_scenes(2, 4, 64, 192, 320, seed=15)
    static = {k: v.cuda() for k, v in first.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile outside the capture
        path_safety(**static, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = path_safety(**static, backend="triton")
    for scenes in (first, second):
        for k, v in scenes.items():
            static[k].copy_(v)
        for x in captured[:3]:
            x.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(captured, reference(scenes))
