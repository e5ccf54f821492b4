"""Path safety batched over all B*N*T patches with torch and Kornia ops (CPU or GPU).

Each patch is gathered as a (P + 2) x (P + 2) window whose border ring already holds the
reflect-101 neighbours of the *clipped* crop (OpenCV's border is relative to the crop it is
given, not to the image), so one valid-mode 3x3 filter over the window gives exactly
``cv2.Laplacian(crop_gray, cv2.CV_64F)`` on the crop. Rows and columns of the window
beyond a border-clipped crop are gathered from clamped indices and masked out of every
statistic. Patches are processed in chunks to bound memory.
"""

from __future__ import annotations

import kornia
import torch

from srdrl.camera import project_points, visible

from .path_safety_common import (
    COLOUR_SCALE,
    GRAY_SHIFT,
    GRAY_WEIGHTS,
    PATCH_SIZE,
    TEXTURE_SCALE,
    PathSafety,
    reference_colour,
)

# cv2.Laplacian with ksize=1.
LAPLACIAN_4 = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def rgb_to_gray_opencv(rgb: torch.Tensor) -> torch.Tensor:
    """Grayscale (...) int32 of uint8 RGB (..., 3), bit-exact with cv2.COLOR_RGB2GRAY."""
    c = rgb.to(torch.int32)
    wr, wg, wb = GRAY_WEIGHTS
    acc = c[..., 0] * wr + c[..., 1] * wg + c[..., 2] * wb + (1 << (GRAY_SHIFT - 1))
    return acc >> GRAY_SHIFT


def reflect101(index: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """OpenCV BORDER_REFLECT_101 of crop-local ``index`` in -1..length (tensors broadcast).

    -1 -> 1 and length -> length - 2; a crop of length 1 reflects onto itself. Indices past
    ``length`` are clamped into the crop (their values are masked by the caller).
    """
    index = index.abs()
    index = torch.where(index >= length, 2 * (length - 1) - index, index)
    return torch.minimum(index.clamp(min=0), length - 1)


def _crop_bounds(centre: torch.Tensor, patch_size: int, size: int):
    """First index and length of the clipped crop around ``centre`` along one axis."""
    start = centre - patch_size // 2
    first = start.clamp(min=0)
    return first, (start + patch_size).clamp(max=size) - first


def _chunk_statistics(images, scene, rows0, nrows, cols0, ncols, patch_size):
    """Laplacian variance (m,) and mean RGB (m, 3), float32, of m crops given by their bounds."""
    _, H, W, _ = images.shape
    window = torch.arange(-1, patch_size + 1, device=images.device)  # (P + 2,) crop-local
    rows = rows0[:, None] + reflect101(window[None, :], nrows[:, None])  # (m, P + 2)
    cols = cols0[:, None] + reflect101(window[None, :], ncols[:, None])  # (m, P + 2)
    pixel = (scene[:, None, None] * H + rows[:, :, None]) * W + cols[:, None, :]  # (m, P+2, P+2)
    rgb = images.reshape(-1, 3)[pixel]  # (m, P + 2, P + 2, 3) uint8

    gray = rgb_to_gray_opencv(rgb).to(torch.float32)[:, None]  # (m, 1, P + 2, P + 2)
    kernel = LAPLACIAN_4.to(images.device)[None]  # (1, 3, 3)
    # Valid mode: the window's ring supplies the borders. Exact in float32 (small integers).
    lap = kornia.filters.filter2d(gray, kernel, padding="valid")[:, 0]  # (m, P, P)

    inside = torch.arange(patch_size, device=images.device)
    valid = (inside[None, :, None] < nrows[:, None, None]) & (
        inside[None, None, :] < ncols[:, None, None]
    )  # (m, P, P)
    count = (nrows * ncols).to(torch.float32)  # (m,)
    mean = torch.where(valid, lap, 0.0).sum(dim=(1, 2)) / count
    deviation = torch.where(valid, lap - mean[:, None, None], 0.0)  # two-pass variance
    variance = (deviation * deviation).sum(dim=(1, 2)) / count

    crop_rgb = rgb[:, 1:-1, 1:-1].to(torch.float32)  # (m, P, P, 3), crop where valid
    # Sums of at most P*P bytes are exact in float32 for P up to 256.
    mean_rgb = torch.where(valid[..., None], crop_rgb, 0.0).sum(dim=(1, 2)) / count[:, None]
    return variance, mean_rgb


def path_safety_kornia(
    images: torch.Tensor,
    trajectories: torch.Tensor,
    K: torch.Tensor,
    T_cam_from_ego: torch.Tensor,
    *,
    patch_size: int = PATCH_SIZE,
    texture_scale: float = TEXTURE_SCALE,
    colour_scale: float = COLOUR_SCALE,
    ref_rgb: torch.Tensor | None = None,
    chunk_patches: int = 4096,
) -> PathSafety:
    """:func:`srdrl.kernels.path_safety` with batched tensor ops; inputs already validated."""
    B, H, W, _ = images.shape
    N, T = trajectories.shape[1:3]
    f64 = torch.float64
    uv, depth = project_points(trajectories.to(f64), K.to(f64), T_cam_from_ego.to(f64))
    vis = visible(uv, depth, W, H)  # (B, N, T) bool
    # Invisible points may be far off (or NaN with check_finite=False): park them at 0.
    centre = torch.where(vis[..., None], torch.floor(uv + 0.5), 0.0)  # (B, N, T, 2)
    cu = centre[..., 0].clamp(0, W - 1).long().reshape(-1)  # (M,), M = B*N*T
    cv = centre[..., 1].clamp(0, H - 1).long().reshape(-1)
    rows0, nrows = _crop_bounds(cv, patch_size, H)
    cols0, ncols = _crop_bounds(cu, patch_size, W)
    scene = torch.arange(B, device=images.device).repeat_interleave(N * T)  # (M,)

    variance = torch.zeros(B * N * T, dtype=torch.float32, device=images.device)
    mean_rgb = torch.zeros(B * N * T, 3, dtype=torch.float32, device=images.device)
    for s in range(0, B * N * T, chunk_patches):
        part = slice(s, s + chunk_patches)
        variance[part], mean_rgb[part] = _chunk_statistics(
            images, scene[part], rows0[part], nrows[part], cols0[part], ncols[part], patch_size
        )
    variance = torch.where(vis, variance.view(B, N, T), 0.0)

    ref = reference_colour(images) if ref_rgb is None else ref_rgb
    ref = ref.to(torch.float32)[:, None, None, :]  # (B, 1, 1, 3)
    distance = torch.linalg.vector_norm(mean_rgb.view(B, N, T, 3) - ref, dim=-1) / 255.0
    distance = torch.where(vis, distance, 0.0)  # (B, N, T)

    count = vis.sum(dim=-1)  # (B, N)
    denom = count.clamp(min=1).to(torch.float32)
    texture = (variance.sum(dim=-1) / denom / texture_scale).clamp(0.0, 1.0)
    consistency = 1.0 - (distance.sum(dim=-1) / denom / colour_scale).clamp(0.0, 1.0)
    safety = torch.where(count > 0, 0.5 * (1.0 - texture) + 0.5 * consistency, 0.5)
    return PathSafety(safety, variance, distance, vis)
