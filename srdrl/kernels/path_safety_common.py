"""What every path-safety backend shares: the result type, the grey weights, the reference
region and its mean colour, and the names of the backends.

Each backend (``path_safety_triton``, ``path_safety_kornia``, ``reference``) and the
dispatcher (``path_safety``) import from here and from nothing else in this package, so
no backend depends on the dispatcher or on another backend. The math these pieces encode
is in docs/DESIGN.md, "Path safety".
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BACKENDS = ("auto", "triton", "kornia", "reference")
"""Values of ``path_safety(backend=...)``; "auto" picks Triton on CUDA, Kornia elsewhere."""

# OpenCV's RGB2GRAY for uint8 is fixed point with 15 fractional bits, rounded half up
# (0.299, 0.587, 0.114 scaled by 2^15, summing to exactly 2^15). The 14-bit weights
# (4899, 9617, 1868) of its YUV code differ on 43864 of the 2^24 colours; the test checks
# all of them against cv2.
GRAY_SHIFT = 15
GRAY_WEIGHTS = (9798, 19235, 3735)

# The scoring parameters' defaults, shared by the dispatcher and every backend (srdrl's
# RewardConfig has the same values: safety_patch_size, texture_scale, colour_scale).
PATCH_SIZE = 32
"""Side of the square patch scored around each waypoint, pixels."""
TEXTURE_SCALE = 1000.0
"""Laplacian variance (grey levels^2) that counts as fully rough."""
COLOUR_SCALE = 0.5
"""Colour distance (RGB / 255) that counts as fully inconsistent."""


class PathSafety(NamedTuple):
    """Scores of B scenes x N candidates x T waypoints.

    Invisible waypoints (behind the camera or off the image) have variance 0 and colour
    distance 0, so that sums over T equal sums over visible waypoints.
    """

    safety: torch.Tensor
    """(B, N) float32 in [0, 1]; 0.5 for a candidate with no visible waypoint."""
    variance: torch.Tensor
    """(B, N, T) float32: Laplacian variance of each waypoint's patch (grey levels^2)."""
    colour_distance: torch.Tensor
    """(B, N, T) float32: ||patch mean RGB - reference RGB|| / 255."""
    visible: torch.Tensor
    """(B, N, T) bool: depth > 0.1 m and the projection lies inside the image."""


def reference_region(height: int, width: int) -> tuple[int, int, int, int]:
    """Rows r0..r1 and columns c0..c1 (exclusive ends) of the bottom-centre region.

    Rows int(0.8 H)..H, columns int(0.4 W)..int(0.6 W), widened to one pixel for tiny
    images so that the mean is always defined.
    """
    r0, c0 = int(0.8 * height), int(0.4 * width)
    c1 = max(int(0.6 * width), c0 + 1)
    return min(r0, height - 1), height, c0, c1


def reference_colour(images: torch.Tensor) -> torch.Tensor:
    """Mean RGB (B, 3) float64 of each image's bottom-centre region; images (B, H, W, 3) uint8.

    Used by the reference and Kornia backends (the Triton one sums the same region in its
    own kernel). The sum is taken in int32, exactly (any region under 8.4 million pixels),
    then divided once.
    """
    r0, r1, c0, c1 = reference_region(images.shape[1], images.shape[2])
    region = images[:, r0:r1, c0:c1]  # (B, rows, cols, 3) uint8 view
    total = region.sum(dim=(1, 2), dtype=torch.int32)  # (B, 3)
    return total.to(torch.float64) / ((r1 - r0) * (c1 - c0))
