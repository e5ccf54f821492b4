"""Pinhole camera: ego-frame points to pixels and back.

Frames (docs/DESIGN.md, "Frames and shapes"): ego x forward, y left, z up (metres); camera
in the OpenCV convention, x right, y down, z forward; pixel centres at integer coordinates.
Every scene carries its intrinsics ``K`` (3x3) and the rigid transform ``T_cam_from_ego``
(4x4). This module is the one implementation of the projection used by the renderer, the
scoring kernels, the rewards and the pictures. It works on torch tensors of any float dtype
and any leading batch shape; NumPy callers wrap with ``torch.as_tensor``.
"""

from __future__ import annotations

import math

import torch

MIN_DEPTH = 0.1
"""A point is visible only when its camera-frame depth exceeds this (metres)."""


def camera_rotation(pitch_down_rad: float, dtype=torch.float64) -> torch.Tensor:
    """Rotation camera <- ego for a forward camera pitched down by ``pitch_down_rad``.

    Rows are the camera axes written in ego coordinates.
    """
    c, s = math.cos(pitch_down_rad), math.sin(pitch_down_rad)
    return torch.tensor(
        [
            [0.0, -1.0, 0.0],  # camera x (right) = -ego y
            [-s, 0.0, -c],  # camera y (down), tilted with the pitch
            [c, 0.0, -s],  # camera z (optical axis), pitched below the horizon
        ],
        dtype=dtype,
    )


def default_camera(
    width: int,
    height: int,
    hfov_deg: float = 90.0,
    mount_height: float = 1.5,
    pitch_deg: float = 8.0,
    mount_x: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic front camera: returns ``K`` (3, 3) and ``T_cam_from_ego`` (4, 4), float64.

    Square pixels, principal point at the image centre (pixel centres at integers, so the
    centre of a W-wide image is at (W - 1) / 2).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"camera size must be positive, got {width}x{height}")
    f = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
    K = torch.tensor(
        [[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    R = camera_rotation(math.radians(pitch_deg))
    centre = torch.tensor([mount_x, 0.0, mount_height], dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = R
    T[:3, 3] = -R @ centre
    return K, T


def _batch_broadcast(points: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """Reshape ``points`` (*batch, *rest, 3) to (*batch, M, 3) where ``mat`` is (*batch, r, c)."""
    nb = mat.dim() - 2
    if points.shape[:nb] != mat.shape[:nb]:
        raise ValueError(
            f"points batch shape {tuple(points.shape[:nb])} does not match camera batch "
            f"shape {tuple(mat.shape[:nb])}"
        )
    return points.reshape(*points.shape[:nb], -1, points.shape[-1])


def transform_points(points: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Apply a rigid 4x4 ``T`` (*batch, 4, 4) to ``points`` (*batch, *rest, 3)."""
    flat = _batch_broadcast(points, T)
    R, t = T[..., :3, :3], T[..., :3, 3]
    out = flat @ R.transpose(-1, -2) + t.unsqueeze(-2)
    return out.reshape(points.shape)


def project_points(
    points_ego: torch.Tensor, K: torch.Tensor, T_cam_from_ego: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project ego-frame points (*batch, *rest, 3) to pixels.

    Returns ``uv`` (*batch, *rest, 2) and camera depth ``z`` (*batch, *rest). Where
    ``z <= MIN_DEPTH`` the point is behind (or too close to) the camera; its ``uv`` is
    computed with a depth of 1 so that it stays finite, and must be masked by the caller
    (see :func:`visible`). Computes in the widest dtype of the three inputs.
    """
    dtype = torch.promote_types(torch.promote_types(points_ego.dtype, K.dtype),
                                T_cam_from_ego.dtype)
    points_ego, K, T_cam_from_ego = (a.to(dtype) for a in (points_ego, K, T_cam_from_ego))
    cam = transform_points(points_ego, T_cam_from_ego)
    z = cam[..., 2]
    safe = torch.where(z > MIN_DEPTH, z, torch.ones_like(z))
    flat = _batch_broadcast(cam, K)
    pix = (flat @ K.transpose(-1, -2)).reshape(cam.shape)
    uv = pix[..., :2] / safe.unsqueeze(-1)
    return uv, z


def visible(uv: torch.Tensor, z: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Visibility (docs/DESIGN.md, "Path safety"): ``z > 0.1`` and ``0 <= u < W`` and
    ``0 <= v < H``."""
    u, v = uv[..., 0], uv[..., 1]
    return (z > MIN_DEPTH) & (u >= 0) & (u < width) & (v >= 0) & (v < height)


def pixel_grid(width: int, height: int, dtype=torch.float64) -> torch.Tensor:
    """Pixel-centre coordinates (H, W, 2) as (u, v)."""
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype), torch.arange(width, dtype=dtype), indexing="ij"
    )
    return torch.stack([u, v], dim=-1)


def unproject_to_ground(
    uv: torch.Tensor, K: torch.Tensor, T_cam_from_ego: torch.Tensor, ground_z: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersect the rays through pixels ``uv`` (..., 2) with the plane z = ``ground_z``.

    ``K`` (3, 3) and ``T_cam_from_ego`` (4, 4) describe one camera. Returns ego-frame
    points (..., 3) and a mask of rays that hit the ground in front of the camera (rays at
    or above the horizon get a point at the origin and ``False``).
    """
    Kinv = torch.linalg.inv(K)
    R, t = T_cam_from_ego[:3, :3], T_cam_from_ego[:3, 3]
    centre = -R.T @ t  # camera centre in the ego frame
    # Ray directions in the ego frame, M = R^T K^-1, written out per component: a (..., 2)
    # by (3, 3) matmul is slow on CPU for millions of pixels.
    M = R.T @ Kinv
    u, v = uv[..., 0], uv[..., 1]
    rays_ego = torch.stack([M[i, 0] * u + M[i, 1] * v + M[i, 2] for i in range(3)], dim=-1)
    dz = rays_ego[..., 2]
    hits = dz < -1e-9
    s = (ground_z - centre[2]) / torch.where(hits, dz, -1.0)
    hits = hits & (s > 0)
    points = (centre + s.unsqueeze(-1) * rays_ego) * hits.unsqueeze(-1)
    return points, hits


def pose_matrix(x: float, y: float, yaw: float, dtype=torch.float64) -> torch.Tensor:
    """4x4 transform t0-ego <- ego at a planar pose (x, y, yaw) given in the t0 ego frame."""
    c, s = math.cos(yaw), math.sin(yaw)
    T = torch.eye(4, dtype=dtype)
    T[0, 0], T[0, 1], T[1, 0], T[1, 1] = c, -s, s, c
    T[0, 3], T[1, 3] = x, y
    return T
