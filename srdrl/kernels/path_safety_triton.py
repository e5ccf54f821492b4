"""Path safety as fused Triton kernels (CUDA; any device under ``TRITON_INTERPRET=1``).

Two launches, no host syncs, no data-dependent shapes and nothing allocated but the
outputs, a (3, B*N*T) float32 scratch of patch mean colours and a (B, G, 3) int32 scratch of
reference-colour partial sums, so the whole call can be captured in a CUDA graph:

1. ``_patch_statistics_kernel``, one program (one warp for P <= 64) per waypoint, grid
   B*N*T + B*G: project the point in float64 from K and T (in srdrl.camera's order), walk
   its clipped P x P crop row by row (unmasked when the crop lies wholly inside the image,
   the common case; masked row by row when the border clips it), and keep the Laplacian's
   integer moments and the colour sums in registers; write variance, mean colour and
   visibility.
   The last B*G programs (none when ``ref_rgb`` is given) each sum R, G, B over one tile
   of rows of a scene's bottom-centre region instead, in integers.
2. ``_candidate_safety_kernel``: per candidate, the reference colour (the scene's partial
   sums / pixels, or the given one), each waypoint's colour distance, and masked means over
   T -> safety.

Why the reference colour is summed beside the patches rather than first: as a launch of its
own ahead of the patch kernel (which then read the partial sums in every one of its 65536
programs at the large size) it cost ~9 us of ~102; the colour distance needs the reference
only in the second pass, which reads it once per candidate.

Why per-waypoint programs and a second pass rather than one program per candidate: at the
small benchmark size (B*N = 32 candidates) one program per candidate would occupy 32 of an
H100's 132 SMs and walk 64 patches each; per-waypoint programs spread the patches over the
whole machine, and the second pass reads only 17 bytes per waypoint (and writes 4).

How a patch is read: lane j of the warp holds crop column j and walks down the rows, so a
row's 3 * P bytes come in as 3 coalesced byte loads per lane and every byte of the patch
is loaded exactly once (nothing else of the image is touched). The vertical neighbours are
the previous and next rows, already in registers; the horizontal ones come from the
neighbouring lanes with ``tl.gather`` within the warp, which lowers to two shuffles. So the
4-neighbourhood costs no reloads. The variance comes from the Laplacian's integer moments,
exact in int64 (see the kernel).

Why an interior walk beside the masked one, the figures measured, and the versions that
measured worse: docs/DESIGN.md, "Path safety" (latest figures: benchmarks/RESULTS.md).

Projection: from K and T inside the kernel (21 scalar loads, a few float64 operations per
waypoint) rather than from a K @ T precomputed with torch: that bmm and its casts measured
9 us per call, against a 20 us budget for the whole call at the small size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from srdrl.camera import MIN_DEPTH

from .path_safety_common import (
    COLOUR_SCALE,
    GRAY_SHIFT,
    GRAY_WEIGHTS,
    PATCH_SIZE,
    TEXTURE_SCALE,
    PathSafety,
    reference_region,
)

ROW_UNROLL = 8
"""Unroll factor of the loops over a patch's rows: best of 2, 4, 8, 12, 16 with the interior
walk on an H200, before the reference colour moved into the patch kernel (large case 100.7
us at 8, 106.7 at 4, 104.6 at 16; small case 14.7 us at 4 and 8); 4 was best of 2, 4, 8 on
an H100 before the interior walk existed."""


@triton.jit
def _reflect101(index, length):
    """OpenCV BORDER_REFLECT_101 of crop-local ``index`` in -1..length; clamps beyond."""
    index = tl.abs(index)
    index = tl.where(index >= length, 2 * (length - 1) - index, index)
    return tl.minimum(tl.maximum(index, 0), length - 1)


@triton.jit
def _load_gray_row(pixel, mask, W_RED: tl.constexpr, W_GREEN: tl.constexpr,
                   W_BLUE: tl.constexpr, SHIFT: tl.constexpr):
    """One crop row: grey levels and R, G, B (int32, 0 where masked) from its RGB bytes,
    grey exactly as OpenCV's fixed-point RGB2GRAY."""
    red = tl.load(pixel, mask=mask, other=0).to(tl.int32)
    green = tl.load(pixel + 1, mask=mask, other=0).to(tl.int32)
    blue = tl.load(pixel + 2, mask=mask, other=0).to(tl.int32)
    gray = (red * W_RED + green * W_GREEN + blue * W_BLUE + (1 << (SHIFT - 1))) >> SHIFT
    return gray, red, green, blue


@triton.jit
def _laplacian_row(i, pixel, row_bytes, j, rows, cols, west, east, prev, cur, lap_sum,
                   lap_sq_sum, sum_red, sum_green, sum_blue, W_RED: tl.constexpr,
                   W_GREEN: tl.constexpr, W_BLUE: tl.constexpr, SHIFT: tl.constexpr):
    """Laplacian of crop row i >= 1 from rows i - 1, i in registers and row i + 1 loaded
    here; adds it to the lane's moments and row i + 1 to the colour sums."""
    # Masks as "lane < width of this row": every condition stays one tensor compare (and
    # Triton's interpreter cannot AND a scalar bool into a tensor).
    nxt, red, green, blue = _load_gray_row(pixel + (i + 1) * row_bytes,
                                           j < tl.where(i + 1 < rows, cols, 0),
                                           W_RED, W_GREEN, W_BLUE, SHIFT)
    down = tl.where(i + 1 < rows, nxt, prev)  # reflect-101: row h -> h - 2
    across = tl.gather(cur, west, 0) + tl.gather(cur, east, 0)  # lane shuffles
    lap = tl.where(j < tl.where(i < rows, cols, 0), prev + down + across - 4 * cur, 0)
    return (nxt, lap_sum + lap, lap_sq_sum + lap * lap, sum_red + red, sum_green + green,
            sum_blue + blue)


@triton.jit
def _moments(lap_sum, lap_sq_sum, sum_red, sum_green, sum_blue):
    """A crop's sums over the lanes: sum(L) (int64), sum(L^2) (int64), sums of R, G, B."""
    return (tl.sum(lap_sum).to(tl.int64), tl.sum(lap_sq_sum.to(tl.int64)), tl.sum(sum_red),
            tl.sum(sum_green), tl.sum(sum_blue))


@triton.jit
def _clipped_moments(pixel, row_bytes, j, rows, cols, PATCH: tl.constexpr,
                     ROW_UNROLL: tl.constexpr, W_RED: tl.constexpr, W_GREEN: tl.constexpr,
                     W_BLUE: tl.constexpr, SHIFT: tl.constexpr):
    """Laplacian moments and colour sums of a crop of ``rows`` x ``cols`` <= PATCH (clipped
    by the image border; no rows for an invisible point), every row and lane masked."""
    west = _reflect101(j - 1, cols)  # reflect-101 neighbour columns: -1 -> 1, w -> w - 2
    east = _reflect101(j + 1, cols)
    # Row 0, peeled out of the loop: its upper neighbour reflects to row 1, like the lower
    # one (a 1-row crop reflects onto itself). An earlier loop that chose the upper row
    # with tl.where(i > 0, ...) was right in the interpreter but wrong compiled (Triton
    # 3.6, H100); the tests on CUDA would catch a regression.
    cur, sum_red, sum_green, sum_blue = _load_gray_row(
        pixel, j < tl.where(rows > 0, cols, 0), W_RED, W_GREEN, W_BLUE, SHIFT)
    nxt, red, green, blue = _load_gray_row(
        pixel + row_bytes, j < tl.where(rows > 1, cols, 0), W_RED, W_GREEN, W_BLUE, SHIFT)
    down = tl.where(rows > 1, nxt, cur)
    across = tl.gather(cur, west, 0) + tl.gather(cur, east, 0)
    lap_sum = tl.where(j < tl.where(rows > 0, cols, 0), 2 * down + across - 4 * cur, 0)
    lap_sq_sum = lap_sum * lap_sum  # <= PATCH * 1020^2 per lane: fits int32
    sum_red += red
    sum_green += green
    sum_blue += blue
    prev = cur
    cur = nxt
    # A row loop unrolled ROW_UNROLL times: enough rows in flight per warp to hide the
    # load latency at ~55 registers (a full unroll held 186 and ran at 2.6x the time).
    for i in tl.range(1, PATCH, loop_unroll_factor=ROW_UNROLL):
        cur_next, lap_sum, lap_sq_sum, sum_red, sum_green, sum_blue = _laplacian_row(
            i, pixel, row_bytes, j, rows, cols, west, east, prev, cur, lap_sum, lap_sq_sum,
            sum_red, sum_green, sum_blue, W_RED, W_GREEN, W_BLUE, SHIFT)
        prev = cur
        cur = cur_next
    return _moments(lap_sum, lap_sq_sum, sum_red, sum_green, sum_blue)


@triton.jit
def _interior_moments(pixel, row_bytes, j, PATCH: tl.constexpr, ROW_UNROLL: tl.constexpr,
                      W_RED: tl.constexpr, W_GREEN: tl.constexpr, W_BLUE: tl.constexpr,
                      SHIFT: tl.constexpr):
    """:func:`_clipped_moments` of a whole PATCH x PATCH crop (PATCH >= 3) inside the
    image: the same sums with no per-row masks or selects. Only lanes >= PATCH (when the
    lane count is the next power of two above it) are masked, by a compile-time mask."""
    lane = j < PATCH
    west = _reflect101(j - 1, PATCH)
    east = _reflect101(j + 1, PATCH)
    cur, sum_red, sum_green, sum_blue = _load_gray_row(pixel, lane, W_RED, W_GREEN, W_BLUE,
                                                       SHIFT)
    nxt, red, green, blue = _load_gray_row(pixel + row_bytes, lane, W_RED, W_GREEN, W_BLUE,
                                           SHIFT)
    # row 0: its upper neighbour reflects to row 1
    lap_sum = tl.where(lane, 2 * nxt + tl.gather(cur, west, 0) + tl.gather(cur, east, 0)
                       - 4 * cur, 0)
    lap_sq_sum = lap_sum * lap_sum
    sum_red += red
    sum_green += green
    sum_blue += blue
    prev = cur
    cur = nxt
    for i in tl.range(1, PATCH - 1, loop_unroll_factor=ROW_UNROLL):
        nxt, red, green, blue = _load_gray_row(pixel + (i + 1) * row_bytes, lane, W_RED,
                                               W_GREEN, W_BLUE, SHIFT)
        lap = tl.where(lane, prev + nxt + tl.gather(cur, west, 0) + tl.gather(cur, east, 0)
                       - 4 * cur, 0)
        lap_sum += lap
        lap_sq_sum += lap * lap
        sum_red += red
        sum_green += green
        sum_blue += blue
        prev = cur
        cur = nxt
    # the last row: its lower neighbour reflects to the row above
    lap = tl.where(lane, 2 * prev + tl.gather(cur, west, 0) + tl.gather(cur, east, 0)
                   - 4 * cur, 0)
    return _moments(lap_sum + lap, lap_sq_sum + lap * lap, sum_red, sum_green, sum_blue)


@triton.jit
def _reference_tile_sums(image_ptr, partial_ptr, tile, tiles_per_scene, height, width,
                         row0, col0, region_rows, region_cols, ROWS: tl.constexpr,
                         COLS: tl.constexpr):
    """Integer sums of R, G, B over rows ``ROWS * g ..`` of scene s's bottom-centre region
    (``tile = s * tiles_per_scene + g``), written to ``partial_ptr[tile]``. One warp walks
    the tile row by row, ``COLS`` pixels at a time, so that its registers stay those of a
    single row chunk (the patch walk shares the kernel and its register count)."""
    scene = tile // tiles_per_scene
    first = (tile % tiles_per_scene) * ROWS
    c = tl.arange(0, COLS)
    scene_base = image_ptr + scene.to(tl.int64) * height * width * 3
    sum_red = tl.zeros((COLS,), tl.int32)
    sum_green = tl.zeros((COLS,), tl.int32)
    sum_blue = tl.zeros((COLS,), tl.int32)
    for r in tl.range(first, first + ROWS):
        for c0 in tl.range(0, region_cols, COLS):
            pixel = scene_base + ((row0 + r) * width + col0 + c0 + c) * 3
            live = c0 + c < tl.where(r < region_rows, region_cols, 0)  # one tensor compare
            sum_red += tl.load(pixel, mask=live, other=0).to(tl.int32)
            sum_green += tl.load(pixel + 1, mask=live, other=0).to(tl.int32)
            sum_blue += tl.load(pixel + 2, mask=live, other=0).to(tl.int32)
    out = partial_ptr + tile * 3
    tl.store(out, tl.sum(sum_red))
    tl.store(out + 1, tl.sum(sum_green))
    tl.store(out + 2, tl.sum(sum_blue))


@triton.jit
def _dot3(row_ptr, a, b, c):
    """row . (a, b, c) in float64 for a matrix row of any float dtype."""
    return (tl.load(row_ptr).to(tl.float64) * a + tl.load(row_ptr + 1).to(tl.float64) * b
            + tl.load(row_ptr + 2).to(tl.float64) * c)


@triton.jit(do_not_specialize=["num_waypoints", "waypoints_per_scene", "height", "width",
                               "ref_row0", "ref_col0", "ref_rows", "ref_cols",
                               "ref_tiles_per_scene"])
def _patch_statistics_kernel(
    image_ptr,  # (B, H, W, 3) uint8, contiguous
    points_ptr,  # (B, N, T, 3) float32/64 ego frame
    K_ptr,  # (B, 3, 3) float32/64
    T_ptr,  # (B, 4, 4) float32/64, camera <- ego
    partial_ptr,  # (B, G, 3) int32 out: reference-region partial sums (unused: G = 0)
    variance_ptr,  # (B, N, T) float32 out
    colour_ptr,  # (3, B*N*T) float32 out: each patch's mean R, G, B
    visible_ptr,  # (B, N, T) uint8 out (a bool tensor's bytes)
    num_waypoints,  # B * N * T: programs past it sum reference tiles
    waypoints_per_scene,  # N * T
    height,
    width,
    ref_row0,
    ref_col0,
    ref_rows,
    ref_cols,
    ref_tiles_per_scene,  # G
    PATCH: tl.constexpr,
    BLOCK: tl.constexpr,  # power of two >= PATCH: crop columns, one per lane
    ROW_UNROLL: tl.constexpr,  # unroll factor of the row loop
    REF_ROWS: tl.constexpr,  # region rows per reference tile
    REF_COLS: tl.constexpr,  # region columns loaded at a time
    INTERIOR_FAST_PATH: tl.constexpr,  # crops inside the image skip the masks (PATCH >= 3)
    MIN_Z: tl.constexpr,
    W_RED: tl.constexpr,
    W_GREEN: tl.constexpr,
    W_BLUE: tl.constexpr,
    SHIFT: tl.constexpr,
):
    waypoint = tl.program_id(0)
    if waypoint >= num_waypoints:  # the last B * G programs: reference-region tiles
        _reference_tile_sums(image_ptr, partial_ptr, waypoint - num_waypoints,
                             ref_tiles_per_scene, height, width, ref_row0, ref_col0,
                             ref_rows, ref_cols, REF_ROWS, REF_COLS)
        return
    scene = waypoint // waypoints_per_scene

    # Projection in float64 in srdrl.camera.project_points' order: cam = R p + t, then K.
    x = tl.load(points_ptr + waypoint * 3).to(tl.float64)
    y = tl.load(points_ptr + waypoint * 3 + 1).to(tl.float64)
    z = tl.load(points_ptr + waypoint * 3 + 2).to(tl.float64)
    t = T_ptr + scene * 16
    cam_x = _dot3(t, x, y, z) + tl.load(t + 3).to(tl.float64)
    cam_y = _dot3(t + 4, x, y, z) + tl.load(t + 7).to(tl.float64)
    depth = _dot3(t + 8, x, y, z) + tl.load(t + 11).to(tl.float64)
    k = K_ptr + scene * 9
    safe_depth = tl.where(depth > MIN_Z, depth, 1.0)
    u = _dot3(k, cam_x, cam_y, depth) / safe_depth
    v = _dot3(k + 3, cam_x, cam_y, depth) / safe_depth
    seen = (depth > MIN_Z) & (u >= 0) & (u < width) & (v >= 0) & (v < height)

    # Centre pixel; invisible (possibly NaN) points are parked at 0 before the int cast.
    cu = tl.minimum(tl.where(seen, tl.floor(u + 0.5), 0.0), width - 1.0).to(tl.int32)
    cv = tl.minimum(tl.where(seen, tl.floor(v + 0.5), 0.0), height - 1.0).to(tl.int32)
    top = cv - PATCH // 2
    left = cu - PATCH // 2
    row0 = tl.maximum(top, 0)
    col0 = tl.maximum(left, 0)
    # Crop size, >= 1 for a visible point; an invisible one gets no rows (so no loads).
    rows = tl.where(seen, tl.minimum(top + PATCH, height) - row0, 0)
    cols = tl.minimum(left + PATCH, width) - col0

    j = tl.arange(0, BLOCK)  # crop column, one per lane
    row_bytes = width * 3
    pixel = image_ptr + scene.to(tl.int64) * height * row_bytes + (row0 * width + col0 + j) * 3
    # A crop wholly inside the image (most of them) takes the unmasked walk; the branch is
    # uniform over the warp (one waypoint per program). Without the fast path the condition
    # is a compile-time False and only the masked walk is compiled.
    interior = (rows == PATCH) & (cols == PATCH)
    if not INTERIOR_FAST_PATH:
        interior = False
    if interior:
        s1, s2, total_red, total_green, total_blue = _interior_moments(
            pixel, row_bytes, j, PATCH, ROW_UNROLL, W_RED, W_GREEN, W_BLUE, SHIFT)
    else:
        s1, s2, total_red, total_green, total_blue = _clipped_moments(
            pixel, row_bytes, j, rows, cols, PATCH, ROW_UNROLL, W_RED, W_GREEN, W_BLUE,
            SHIFT)

    # Population variance from exact integer moments: n * sum(L^2) - sum(L)^2 is exact in
    # int64, so nothing cancels and the result is the correctly rounded variance (a float
    # two-pass mean-then-deviations would only approximate it).
    count = tl.maximum(rows * cols, 1)
    n = count.to(tl.int64)
    variance = ((n * s2 - s1 * s1).to(tl.float64) / (n * n).to(tl.float64)).to(tl.float32)

    count_f = count.to(tl.float32)
    tl.store(variance_ptr + waypoint, tl.where(seen, variance, 0.0))
    tl.store(colour_ptr + waypoint, total_red.to(tl.float32) / count_f)
    tl.store(colour_ptr + num_waypoints + waypoint, total_green.to(tl.float32) / count_f)
    tl.store(colour_ptr + 2 * num_waypoints + waypoint, total_blue.to(tl.float32) / count_f)
    tl.store(visible_ptr + waypoint, seen.to(tl.uint8))


@triton.jit
def _reference_rgb(ref_ptr, scene, groups, pixels, REF_GIVEN: tl.constexpr,
                   GROUP_BLOCK: tl.constexpr):
    """(CANDIDATES, 1) reference colours of the candidates' scenes: given, or the sum of
    the scene's partial sums / pixels (integer sums, so the order does not matter)."""
    if REF_GIVEN:
        ref = ref_ptr + scene[:, None] * 3
        return tl.load(ref), tl.load(ref + 1), tl.load(ref + 2)
    g = tl.arange(0, GROUP_BLOCK)[None, :]
    part = ref_ptr + (scene[:, None] * groups + g) * 3
    live = g < groups
    scale = 1.0 / pixels.to(tl.float32)
    red = tl.sum(tl.load(part, mask=live, other=0), axis=1).to(tl.float32) * scale
    green = tl.sum(tl.load(part + 1, mask=live, other=0), axis=1).to(tl.float32) * scale
    blue = tl.sum(tl.load(part + 2, mask=live, other=0), axis=1).to(tl.float32) * scale
    return red[:, None], green[:, None], blue[:, None]


@triton.jit(do_not_specialize=["num_candidates", "candidates_per_scene", "num_waypoints",
                               "ref_groups", "ref_pixels"])
def _candidate_safety_kernel(
    variance_ptr,  # (B*N, T) float32
    colour_ptr,  # (3, B*N*T) float32: patch mean R, G, B
    visible_ptr,  # (B*N, T) uint8
    ref_ptr,  # (B, G, 3) int32 partial sums, or (B, 3) float32 colours when REF_GIVEN
    distance_ptr,  # (B*N, T) float32 out
    safety_ptr,  # (B*N,) float32 out
    num_candidates,
    candidates_per_scene,  # N
    num_waypoints,  # T
    ref_groups,  # G
    ref_pixels,  # pixels of the reference region
    texture_scale,
    colour_scale,
    CANDIDATES: tl.constexpr,
    T_BLOCK: tl.constexpr,
    REF_GIVEN: tl.constexpr,
    GROUP_BLOCK: tl.constexpr,  # power of two >= G
):
    cand = tl.program_id(0) * CANDIDATES + tl.arange(0, CANDIDATES)  # (CANDIDATES,)
    live_cand = cand < num_candidates
    ref_red, ref_green, ref_blue = _reference_rgb(
        ref_ptr, tl.where(live_cand, cand // candidates_per_scene, 0), ref_groups,
        ref_pixels, REF_GIVEN, GROUP_BLOCK)
    plane = num_candidates.to(tl.int64) * num_waypoints  # B*N*T
    t = tl.arange(0, T_BLOCK)
    var_sum = tl.zeros((CANDIDATES,), tl.float32)
    dist_sum = tl.zeros((CANDIDATES,), tl.float32)
    seen = tl.zeros((CANDIDATES,), tl.int32)
    for t0 in range(0, num_waypoints, T_BLOCK):
        mask = live_cand[:, None] & (t0 + t[None, :] < num_waypoints)
        offs = cand[:, None].to(tl.int64) * num_waypoints + t0 + t[None, :]
        visible = tl.load(visible_ptr + offs, mask=mask, other=0) != 0
        d_red = tl.load(colour_ptr + offs, mask=mask, other=0.0) - ref_red
        d_green = tl.load(colour_ptr + plane + offs, mask=mask, other=0.0) - ref_green
        d_blue = tl.load(colour_ptr + 2 * plane + offs, mask=mask, other=0.0) - ref_blue
        distance = tl.where(visible, tl.sqrt(d_red * d_red + d_green * d_green
                                             + d_blue * d_blue) / 255.0, 0.0)
        tl.store(distance_ptr + offs, distance, mask=mask)
        # Invisible waypoints hold zeros, so plain sums are sums over visible ones.
        var_sum += tl.sum(tl.load(variance_ptr + offs, mask=mask, other=0.0), axis=1)
        dist_sum += tl.sum(distance, axis=1)
        seen += tl.sum(visible.to(tl.int32), axis=1)
    denom = tl.maximum(seen, 1).to(tl.float32)
    texture = tl.minimum(tl.maximum(var_sum / denom / texture_scale, 0.0), 1.0)
    consistency = 1.0 - tl.minimum(tl.maximum(dist_sum / denom / colour_scale, 0.0), 1.0)
    safety = tl.where(seen > 0, 0.5 * (1.0 - texture) + 0.5 * consistency, 0.5)
    tl.store(safety_ptr + cand, safety, mask=live_cand)


def allocate_outputs(B: int, N: int, T: int, device) -> PathSafety:
    """Uninitialised output tensors of the right shapes for ``out=``."""
    f32 = torch.float32
    return PathSafety(
        torch.empty(B, N, dtype=f32, device=device),
        torch.empty(B, N, T, dtype=f32, device=device),
        torch.empty(B, N, T, dtype=f32, device=device),
        torch.empty(B, N, T, dtype=torch.bool, device=device),
    )


def _check_out(out: PathSafety, B: int, N: int, T: int, device) -> None:
    expected = allocate_outputs(B, N, T, "meta")
    for name, have, want in zip(PathSafety._fields, out, expected, strict=True):
        if have.shape != want.shape or have.dtype != want.dtype or not have.is_contiguous():
            raise ValueError(f"out.{name} must be contiguous {want.dtype} of shape "
                             f"{tuple(want.shape)}, got {have.dtype} {tuple(have.shape)}")
        if have.device != torch.device(device):
            raise ValueError(f"out.{name} is on {have.device}, inputs on {device}")


def path_safety_triton(
    images: torch.Tensor,
    trajectories: torch.Tensor,
    K: torch.Tensor,
    T_cam_from_ego: torch.Tensor,
    *,
    patch_size: int = PATCH_SIZE,
    texture_scale: float = TEXTURE_SCALE,
    colour_scale: float = COLOUR_SCALE,
    ref_rgb: torch.Tensor | None = None,
    out: PathSafety | None = None,
    interior_fast_path: bool = True,
) -> PathSafety:
    """:func:`srdrl.kernels.path_safety` with the fused kernels; inputs already validated.

    ``out``: preallocated outputs (see :func:`allocate_outputs`) to write into, e.g. the
    static buffers of a CUDA graph; every element is written. ``interior_fast_path``: crops
    wholly inside the image take an unmasked row walk (False: every crop takes the masked
    one; the benchmark times both, the tests check both against the reference).
    """
    B, H, W, _ = images.shape
    N, T = trajectories.shape[1:3]
    device = images.device
    if out is None:
        out = allocate_outputs(B, N, T, device)
    else:
        _check_out(out, B, N, T, device)
    if B * N == 0:
        return out
    if T == 0:
        out.safety.fill_(0.5)
        return out
    images = images.contiguous()

    r0, r1, c0, c1 = reference_region(H, W)
    num_waypoints = B * N * T
    # Reference tiles of ~1024 pixels, walked REF_COLS at a time by one warp, as extra
    # programs of the patch kernel: a launch of their own (8 warps per tile) ahead of it
    # cost ~9 us of the large case's ~102, most of it the patch kernel waiting for it.
    ref_cols = min(triton.next_power_of_2(c1 - c0), 128)
    ref_rows = max(1, 1024 // max(c1 - c0, 1))
    groups = triton.cdiv(r1 - r0, ref_rows) if ref_rgb is None else 0  # tiles per scene
    partial = torch.empty(B, max(groups, 1), 3, dtype=torch.int32, device=device)
    colour = torch.empty(3, num_waypoints, dtype=torch.float32, device=device)
    _patch_statistics_kernel[(num_waypoints + B * groups,)](
        images, trajectories.contiguous(), K.contiguous(), T_cam_from_ego.contiguous(),
        partial, out.variance, colour, out.visible.view(torch.uint8),
        num_waypoints, N * T, H, W, r0, c0, r1 - r0, c1 - c0, groups,
        PATCH=patch_size, BLOCK=triton.next_power_of_2(patch_size), ROW_UNROLL=ROW_UNROLL,
        REF_ROWS=ref_rows, REF_COLS=ref_cols, MIN_Z=MIN_DEPTH,
        INTERIOR_FAST_PATH=interior_fast_path and patch_size >= 3,
        W_RED=GRAY_WEIGHTS[0], W_GREEN=GRAY_WEIGHTS[1], W_BLUE=GRAY_WEIGHTS[2],
        SHIFT=GRAY_SHIFT, num_warps=max(1, triton.next_power_of_2(patch_size) // 64),
    )
    # One warp per program over a small (candidates, T) tile: a 32 x 64 tile held 251
    # registers per thread (a pointer per element) and took 8 us at the small size.
    t_block = min(triton.next_power_of_2(T), 1024)
    group_block = triton.next_power_of_2(max(groups, 1))
    # ... and a (candidates, G) tile of partial sums: few candidates where G is large
    candidates = max(1, min(128 // t_block, 4096 // group_block))
    ref = partial if ref_rgb is None else ref_rgb.to(torch.float32).contiguous()
    _candidate_safety_kernel[(triton.cdiv(B * N, candidates),)](
        out.variance, colour, out.visible.view(torch.uint8), ref, out.colour_distance,
        out.safety, B * N, N, T, groups, (r1 - r0) * (c1 - c0),
        float(texture_scale), float(colour_scale),
        CANDIDATES=candidates, T_BLOCK=t_block, REF_GIVEN=ref_rgb is not None,
        GROUP_BLOCK=group_block, num_warps=1,
    )
    return out
