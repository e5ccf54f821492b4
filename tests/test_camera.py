import math

import pytest
import torch

from srdrl.camera import (
    MIN_DEPTH,
    default_camera,
    pixel_grid,
    pose_matrix,
    project_points,
    transform_points,
    unproject_to_ground,
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
