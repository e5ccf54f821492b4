import math

import pytest
import torch

from srdrl.camera import (
    MIN_DEPTH,
    CameraError,
    camera_rotation,
    default_camera,
    pixel_grid,
    pose_matrix,
    project_points,
    transform_points,
    unproject_to_ground,
    validate_camera,
    visible,
)


@pytest.mark.parametrize("size", [(320, 192), (53, 37), (1280, 720)], ids=str)
def test_ground_round_trip(size):
    w, h = size
    K, T = default_camera(w, h)
    g = torch.Generator().manual_seed(0)
    pts = torch.stack([torch.rand(500, generator=g) * 40 + 2,
                       (torch.rand(500, generator=g) - 0.5) * 20, torch.zeros(500)], -1)
    uv, z = project_points(pts.double(), K, T)
    back, hits = unproject_to_ground(uv, K, T)
    assert hits.all()
    torch.testing.assert_close(back, pts.double(), atol=1e-9, rtol=1e-9)
    # and pixels -> ground -> pixels for every pixel below the horizon
    grid = pixel_grid(w, h)
    ground, hit = unproject_to_ground(grid, K, T)
    uv2, _ = project_points(ground[hit], K, T)
    torch.testing.assert_close(uv2, grid[hit], atol=1e-6, rtol=0)


def test_axes_and_visibility():
    K, T = default_camera(320, 192)
    pts = torch.tensor([[10.0, 0, 0], [10, 3, 0], [10, -3, 0], [-5, 0, 0], [0.05, 0, 1.5]],
                       dtype=torch.float64)
    uv, z = project_points(pts, K, T)
    assert uv[1, 0] < uv[0, 0] < uv[2, 0]  # ego left (+y) is image left (smaller u)
    assert uv[0, 1] > (192 - 1) / 2  # ground ahead is below the principal point
    vis = visible(uv, z, 320, 192)
    assert vis.tolist() == [True, True, True, False, False]
    assert z[3] < 0 and z[4] < MIN_DEPTH and torch.isfinite(uv).all()


def test_batched_and_pose():
    K, T = default_camera(64, 48)
    Kb, Tb = K.expand(3, 3, 3), T.expand(3, 4, 4)
    pts = torch.randn(3, 5, 7, 3, dtype=torch.float64) + torch.tensor([10.0, 0, 0])
    uv, z = project_points(pts, Kb, Tb)
    uv1, z1 = project_points(pts[1], K, T)
    torch.testing.assert_close(uv[1], uv1)
    P = pose_matrix(2.0, 1.0, math.pi / 2)
    torch.testing.assert_close(transform_points(torch.tensor([1.0, 0, 0]).double(), P),
                               torch.tensor([2.0, 2.0, 0.0]).double())
    with pytest.raises(ValueError, match="batch shape"):
        project_points(pts[:2], Kb, Tb)


# --------------------------------------------------------------------------- validation


def _random_camera(g: torch.Generator, w: int, h: int):
    """A pinhole camera with a random rotation (det +1), focal lengths and principal point."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    R = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(R) < 0:
        R[:, 0] = -R[:, 0]
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3], T[:3, 3] = R, torch.randn(3, generator=g, dtype=torch.float64) * 3
    fx, fy = (float(x) for x in torch.rand(2, generator=g) * 900 + 20)
    cx = float(torch.rand(1, generator=g)) * w - 0.5  # on the image, border included
    cy = float(torch.rand(1, generator=g)) * h - 0.5
    K = torch.tensor([[fx, 0.3, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return K, T


@pytest.mark.parametrize("size", [(320, 192), (53, 37), (1, 1), (1280, 720)], ids=str)
def test_valid_cameras_pass(size):
    w, h = size
    validate_camera(*default_camera(w, h), w, h)
    g = torch.Generator().manual_seed(w * h)
    for _ in range(20):
        validate_camera(*_random_camera(g, w, h), w, h)
    K, T = default_camera(w, h)  # written to 4 decimals, as srdrl-make-data writes it
    validate_camera(K, torch.round(T, decimals=4), w, h)
    K[0, 2], K[1, 2] = w - 0.5, -0.5  # the principal point on the image's border
    validate_camera(K, T, w, h)


def _bad(change):
    K, T = default_camera(64, 48)
    size = {"width": 64, "height": 48}
    change(K, T, size)
    return K, T, size


def _scale(m, by):
    m[:3, :3] *= by


@pytest.mark.parametrize(
    "change, field, message",
    [
        (lambda K, T, s: K.zero_(), "K", "is all zeros"),
        (lambda K, T, s: K[:2, :2].zero_(), "K", r"positive focal lengths.*singular"),
        (lambda K, T, s: K.fill_(float("nan")), "K", "NaN or inf"),
        (lambda K, T, s: K[2].fill_(1.0), "K", r"last row \[0, 0, 1\], got \[1, 1, 1\]"),
        (lambda K, T, s: K[1].mul_(-1), "K", "positive focal lengths"),
        (lambda K, T, s: K.copy_(default_camera(1280, 720)[0]), "K",
         r"principal point \(639.5, 359.5\) outside the 64x48 image"),
        (lambda K, T, s: K[1].__setitem__(0, 0.5), "K", "upper triangular"),
        (lambda K, T, s: T.zero_(), "T_cam_from_ego", "is all zeros"),
        (lambda K, T, s: T[3].__setitem__(0, 1.0), "T_cam_from_ego", "last row"),
        (lambda K, T, s: _scale(T, 2.0), "T_cam_from_ego", "must hold a rotation"),
        (lambda K, T, s: _scale(T, 1.002), "T_cam_from_ego", "must hold a rotation"),
        (lambda K, T, s: T[0].mul_(-1), "T_cam_from_ego", r"det R = -1"),
        (lambda K, T, s: T[:3, :3].copy_(camera_rotation(0.1) @ torch.tensor(
            [[1.0, 0.01, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)), "T_cam_from_ego",
         "must hold a rotation"),
        (lambda K, T, s: s.update(width=0), "width", "positive integer"),
        (lambda K, T, s: s.update(height=48.0), "height", "positive integer"),
        (lambda K, T, s: s.update(width=None), "width", "positive integer"),
        (lambda K, T, s: s.update(width=True), "width", "positive integer"),
    ],
    ids=["zero-K", "singular-K", "nan-K", "K-last-row", "mirrored-K", "K-other-resolution",
         "K-lower", "zero-T", "T-last-row", "T-scaled", "T-scaled-past-tolerance",
         "T-reflection", "T-sheared", "width-0", "height-float", "width-none", "width-bool"],
)
def test_invalid_cameras_name_the_part(change, field, message):
    K, T, size = _bad(change)
    with pytest.raises(CameraError, match=f"^{field} .*{message}") as e:
        validate_camera(K, T, size["width"], size["height"])
    assert e.value.field == field and isinstance(e.value, ValueError)


def test_the_faults_the_checks_exist_for():
    """What a zero K and a zero T do to the projection: every waypoint at pixel (0, 0) and
    counted visible, or none visible; validate_camera refuses both."""
    pts = torch.tensor([[10.0, 2.0, 0.0], [20.0, -3.0, 0.0]], dtype=torch.float64)
    K, T = default_camera(64, 48)
    uv, z = project_points(pts, torch.zeros(3, 3, dtype=torch.float64), T)
    assert torch.all(uv == 0) and visible(uv, z, 64, 48).all()
    uv, z = project_points(pts, K, torch.zeros(4, 4, dtype=torch.float64))
    assert not visible(uv, z, 64, 48).any()
    for bad_K, bad_T in ((torch.zeros(3, 3), T), (K, torch.zeros(4, 4))):
        with pytest.raises(CameraError, match="is all zeros"):
            validate_camera(bad_K, bad_T, 64, 48)
