"""Path safety: how rough and how off-colour the terrain under each candidate path looks.

The public entry point of the scoring kernels (docs/DESIGN.md, "Path safety"). For every
waypoint of every candidate trajectory, project it into the scene's camera, crop the P x P
patch around it (smaller at the image border), and measure

- texture: population variance of the OpenCV-style Laplacian of the patch's grayscale,
- colour: distance of the patch's mean RGB from the scene's reference colour (the mean of
  the bottom-centre region, the road just ahead, unless ``ref_rgb`` is given).

Per candidate, over its visible waypoints::

    texture     = clamp(mean variance / texture_scale, 0, 1)
    consistency = 1 - clamp(mean colour distance / colour_scale, 0, 1)
    safety      = 0.5 (1 - texture) + 0.5 consistency      (0.5 with no visible waypoint)

Backends, one module each, all with the same signature and semantics (``reference.py`` is
the oracle); each imports only ``path_safety_common`` of this package, and is imported here
on first use, so Triton and OpenCV load only when chosen:

- ``"triton"`` (``path_safety_triton.py``): fused kernels, CUDA tensors (or any tensors
  under ``TRITON_INTERPRET=1``), capturable in a CUDA graph.
- ``"kornia"`` (``path_safety_kornia.py``): batched torch/Kornia ops, CPU or GPU.
- ``"reference"`` (``reference.py``): the original Python loop over OpenCV calls, in
  float64 (needs ``opencv-python``); its scores are converted to float32 here.
- ``"auto"``: Triton on CUDA, Kornia elsewhere.

This module checks the inputs (clear errors instead of wrong scores) and dispatches.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .path_safety_common import (
    BACKENDS,
    COLOUR_SCALE,
    PATCH_SIZE,
    TEXTURE_SCALE,
    PathSafety,
)


def _check_tensor(name: str, x, rank: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {str(x.dtype).removeprefix('torch.')}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")


_FLOATS = (torch.float32, torch.float64)


def validate_inputs(
    images: torch.Tensor,
    trajectories: torch.Tensor,
    K: torch.Tensor,
    T_cam_from_ego: torch.Tensor,
    patch_size: int,
    texture_scale: float,
    colour_scale: float,
    ref_rgb: torch.Tensor | None,
    backend: str,
    check_finite: bool,
) -> None:
    """Raise TypeError/ValueError naming what is wrong; see :func:`path_safety`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_tensor("images", images, 4, (torch.uint8,))
    _check_tensor("trajectories", trajectories, 4, _FLOATS)
    _check_tensor("K", K, 3, _FLOATS)
    _check_tensor("T_cam_from_ego", T_cam_from_ego, 3, _FLOATS)
    B, H, W, C = images.shape
    if C != 3 or H < 1 or W < 1:
        raise ValueError(
            f"images must be (B, H, W, 3) RGB with H, W >= 1, got {tuple(images.shape)}"
        )
    if trajectories.shape[-1] != 3:
        raise ValueError(f"trajectories must be (B, N, T, 3), got {tuple(trajectories.shape)}")
    if K.shape[1:] != (3, 3):
        raise ValueError(f"K must be (B, 3, 3), got {tuple(K.shape)}")
    if T_cam_from_ego.shape[1:] != (4, 4):
        raise ValueError(f"T_cam_from_ego must be (B, 4, 4), got {tuple(T_cam_from_ego.shape)}")
    batch = {"trajectories": trajectories.shape[0], "K": K.shape[0],
             "T_cam_from_ego": T_cam_from_ego.shape[0]}
    for name, b in batch.items():
        if b != B:
            raise ValueError(f"{name} has batch size {b} but images has {B}")
    if ref_rgb is not None:
        _check_tensor("ref_rgb", ref_rgb, 2, _FLOATS)
        if ref_rgb.shape != (B, 3):
            raise ValueError(f"ref_rgb must be (B, 3) = ({B}, 3), got {tuple(ref_rgb.shape)}")
    others = [trajectories, K, T_cam_from_ego] + ([ref_rgb] if ref_rgb is not None else [])
    for x in others:
        if x.device != images.device:
            raise ValueError(f"all inputs must be on one device: images on {images.device}, "
                             f"another input on {x.device}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        raise TypeError(f"patch_size must be an int, got {type(patch_size).__name__}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if not texture_scale > 0 or not colour_scale > 0:
        raise ValueError(f"texture_scale and colour_scale must be > 0, got {texture_scale} "
                         f"and {colour_scale}")
    # A data-dependent check syncs with the device, which a CUDA graph capture forbids.
    capturing = images.is_cuda and torch.cuda.is_current_stream_capturing()
    if check_finite and not capturing and not bool(torch.isfinite(trajectories).all()):
        raise ValueError("trajectories contain non-finite (NaN or inf) points")


def path_safety(
    images: torch.Tensor,
    trajectories: torch.Tensor,
    K: torch.Tensor,
    T_cam_from_ego: torch.Tensor,
    *,
    patch_size: int = PATCH_SIZE,
    texture_scale: float = TEXTURE_SCALE,
    colour_scale: float = COLOUR_SCALE,
    ref_rgb: torch.Tensor | None = None,
    backend: str = "auto",
    check_finite: bool = True,
) -> PathSafety:
    """Score candidate paths by the texture and colour of the terrain under them.

    Args:
        images: (B, H, W, 3) uint8 RGB, one frame per scene.
        trajectories: (B, N, T, 3) float32 (or float64) waypoints in the ego frame, metres.
        K: (B, 3, 3) camera intrinsics; T_cam_from_ego: (B, 4, 4) ego -> camera transform.
        patch_size: side P of the square patch around each waypoint's pixel.
        texture_scale: Laplacian variance that counts as fully rough.
        colour_scale: colour distance (in units of 255) that counts as fully off-colour.
        ref_rgb: (B, 3) reference colour in 0..255; default: mean of the bottom-centre
            region (rows 0.8H..H, columns 0.4W..0.6W) of each image.
        backend: "auto" (Triton on CUDA, Kornia elsewhere), "triton", "kornia", "reference".
        check_finite: reject non-finite trajectory points. This reads the data, so it
            syncs with the GPU; it is skipped while a CUDA graph is being captured. Pass
            False in hot loops: non-finite points then come out invisible.

    Points behind the camera or off the image are invisible, not errors.
    """
    validate_inputs(images, trajectories, K, T_cam_from_ego, patch_size, texture_scale,
                    colour_scale, ref_rgb, backend, check_finite)
    if backend == "auto":
        backend = "triton" if images.is_cuda else "kornia"
    if backend == "triton" and not images.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set "
                         "before triton is imported); use backend='kornia' on the CPU")
    images = images.contiguous()
    trajectories = trajectories.contiguous()
    result = _backend_function(backend)(
        images, trajectories, K, T_cam_from_ego, patch_size=patch_size,
        texture_scale=float(texture_scale), colour_scale=float(colour_scale), ref_rgb=ref_rgb,
    )
    # The reference scores in float64; .float() leaves float32 tensors as they are.
    return PathSafety(result.safety.float(), result.variance.float(),
                      result.colour_distance.float(), result.visible)


def _backend_function(backend: str) -> Callable[..., PathSafety]:
    """The named backend's scoring function, imported now (not with this module): Triton
    and OpenCV load only when their backend is used."""
    if backend == "triton":
        from .path_safety_triton import path_safety_triton

        return path_safety_triton
    if backend == "kornia":
        from .path_safety_kornia import path_safety_kornia

        return path_safety_kornia
    from .reference import path_safety_reference

    return path_safety_reference
