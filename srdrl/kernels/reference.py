"""Path safety, the plain way: a Python loop over waypoints with OpenCV, in float64.

This is the test oracle, the baseline the benchmarks compare against, and the written-out
math of docs/DESIGN.md "Path safety". It is what the original CPU code did, one waypoint at
a time. As a backend it takes the arguments of the others and returns their
:class:`PathSafety`, in float64 (the dispatcher converts to float32). OpenCV is a
test/benchmark extra, never a runtime dependency, so it is imported only when this runs.
``reference_colour`` lives in ``path_safety_common`` (it is plain torch, shared with the
Kornia backend) and is importable from here too.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from srdrl.camera import project_points, visible

from .path_safety_common import (
    COLOUR_SCALE,
    PATCH_SIZE,
    TEXTURE_SCALE,
    PathSafety,
    reference_colour,
)

__all__ = ["path_safety_reference", "patch_statistics", "reference_colour"]


def _import_cv2():
    try:
        import cv2
    except ImportError as e:  # only a test/benchmark extra
        raise ImportError(
            "the reference path-safety backend needs OpenCV: pip install "
            "opencv-python-headless (or srdrl[test]); use backend='kornia' or 'triton' "
            "otherwise"
        ) from e
    return cv2


def patch_statistics(image: np.ndarray, u: float, v: float, patch_size: int, cv2):
    """Laplacian variance and mean RGB (3,) of the patch around pixel (u, v) of one image."""
    height, width = image.shape[:2]
    cu = min(max(math.floor(u + 0.5), 0), width - 1)
    cv = min(max(math.floor(v + 0.5), 0), height - 1)
    top, left = cv - patch_size // 2, cu - patch_size // 2
    # Clip the start explicitly (a negative NumPy start would wrap); NumPy clips the end.
    crop = image[max(top, 0) : top + patch_size, max(left, 0) : left + patch_size]
    crop = np.ascontiguousarray(crop)  # (h, w, 3) uint8, h, w >= 1
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    # ksize=1: the 4-neighbour kernel [[0,1,0],[1,-4,1],[0,1,0]], reflect-101 borders.
    variance = cv2.Laplacian(gray, cv2.CV_64F).var()
    return float(variance), crop.reshape(-1, 3).mean(axis=0, dtype=np.float64)


def path_safety_reference(
    images: torch.Tensor,
    trajectories: torch.Tensor,
    K: torch.Tensor,
    T_cam_from_ego: torch.Tensor,
    *,
    patch_size: int = PATCH_SIZE,
    texture_scale: float = TEXTURE_SCALE,
    colour_scale: float = COLOUR_SCALE,
    ref_rgb: torch.Tensor | None = None,
) -> PathSafety:
    """:func:`srdrl.kernels.path_safety` one waypoint at a time; returns float64 scores.

    Inputs as validated by ``path_safety``; outputs are on the input device.
    """
    cv2 = _import_cv2()
    device = images.device
    B, H, W, _ = images.shape
    N, T = trajectories.shape[1:3]
    f64 = torch.float64
    uv, depth = project_points(trajectories.to(f64), K.to(f64), T_cam_from_ego.to(f64))
    vis = visible(uv, depth, W, H)  # (B, N, T) bool
    ref = reference_colour(images) if ref_rgb is None else ref_rgb.to(f64)

    images_np = images.cpu().numpy()
    uv_np, vis_np, ref_np = uv.cpu().numpy(), vis.cpu().numpy(), ref.cpu().numpy()
    variance = np.zeros((B, N, T))
    distance = np.zeros((B, N, T))
    for b, n, t in zip(*np.nonzero(vis_np), strict=True):
        u, v = uv_np[b, n, t]
        variance[b, n, t], mean_rgb = patch_statistics(images_np[b], u, v, patch_size, cv2)
        distance[b, n, t] = np.linalg.norm(mean_rgb - ref_np[b]) / 255.0

    safety = np.full((B, N), 0.5)
    for b in range(B):
        for n in range(N):
            seen = vis_np[b, n]
            if not seen.any():
                continue  # neutral: nothing of the path is in view
            texture = np.clip(variance[b, n, seen].mean() / texture_scale, 0.0, 1.0)
            consistency = 1.0 - np.clip(distance[b, n, seen].mean() / colour_scale, 0.0, 1.0)
            safety[b, n] = 0.5 * (1.0 - texture) + 0.5 * consistency

    def back(a):
        return torch.from_numpy(a).to(device)

    return PathSafety(back(safety), back(variance), back(distance), vis)
