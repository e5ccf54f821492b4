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

ROTATION_TOLERANCE = 1e-3
"""Largest entry of |R R^T - I| and largest |det R - 1| accepted for the rotation part of
``T_cam_from_ego``: a rotation written to 4 decimals (as srdrl-make-data writes it) passes,
a scaled or sheared matrix does not."""


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


class CameraError(ValueError):
    """A camera that cannot be a pinhole camera. ``field`` names the bad part (``K``,
    ``T_cam_from_ego``, ``width`` or ``height``); the message reads "<field> <problem>"."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def validate_camera(K, T_cam_from_ego, width: int, height: int) -> None:
    """Check that ``K`` (3, 3), ``T_cam_from_ego`` (4, 4) and the image size describe a
    pinhole camera this module can project with; raise ``CameraError`` naming the part.

    Without these checks a zero or singular K sends every waypoint to pixel (0, 0), which
    counts as visible, and a zero T puts every waypoint at depth 0, invisible.

    - width, height: positive integers (pixels).
    - K: finite, not all zero, last row [0, 0, 1], K[1][0] = 0 (upper triangular; a skew
      K[0][1] is allowed), fx = K[0][0] > 0 and fy = K[1][1] > 0 (so K is invertible),
      principal point (K[0][2], K[1][2]) inside the image or on its border:
      -0.5 <= cx <= W - 0.5 and -0.5 <= cy <= H - 0.5 (pixel centres are at integers, so
      the image's edges are at -0.5 and W - 0.5).
    - T_cam_from_ego: finite, not all zero, last row [0, 0, 0, 1], rotation block R
      orthonormal with det +1: max |R R^T - I| and |det R - 1| within ROTATION_TOLERANCE.
    """
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CameraError(name, f"must be a positive integer (pixels), got {value!r}")
    K = _checked_matrix(K, "K", 3)
    T = _checked_matrix(T_cam_from_ego, "T_cam_from_ego", 4)
    if K[2].tolist() != [0.0, 0.0, 1.0]:
        raise CameraError("K", f"must have the last row [0, 0, 1], got {_row(K[2])}")
    fx, fy, cx, cy = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))
    if fx <= 0 or fy <= 0:
        raise CameraError("K", f"must have positive focal lengths, got fx = {fx:g} and "
                               f"fy = {fy:g} (K is singular or mirrored)")
    if float(K[1, 0]) != 0:
        raise CameraError("K", f"must be upper triangular, got K[1][0] = {float(K[1, 0]):g}")
    if not (-0.5 <= cx <= width - 0.5 and -0.5 <= cy <= height - 0.5):
        raise CameraError("K", f"has its principal point ({cx:g}, {cy:g}) outside the "
                               f"{width}x{height} image (K of another resolution?)")
    if T[3].tolist() != [0.0, 0.0, 0.0, 1.0]:
        raise CameraError("T_cam_from_ego", f"must have the last row [0, 0, 0, 1], got "
                                            f"{_row(T[3])}")
    R = T[:3, :3]
    off = float((R @ R.T - torch.eye(3, dtype=R.dtype)).abs().max())
    det = float(torch.linalg.det(R))
    if off > ROTATION_TOLERANCE or abs(det - 1.0) > ROTATION_TOLERANCE:
        raise CameraError("T_cam_from_ego", f"must hold a rotation (orthonormal, det +1, "
                                            f"tolerance {ROTATION_TOLERANCE:g}), got "
                                            f"max |R R^T - I| = {off:.3g}, det R = {det:.6g}")


def _checked_matrix(m, name: str, n: int) -> torch.Tensor:
    m = torch.as_tensor(m, dtype=torch.float64)
    if tuple(m.shape) != (n, n):
        raise CameraError(name, f"must be {n}x{n}, got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise CameraError(name, "contains NaN or inf")
    if not m.any():
        raise CameraError(name, "is all zeros")
    return m


def _row(row: torch.Tensor) -> str:
    return "[" + ", ".join(f"{x:g}" for x in row.tolist()) + "]"


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
