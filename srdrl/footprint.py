"""Whether a vehicle driving a trajectory enters a hazard: the footprint test of evaluation.

A hazard is a closed polygon in the ego frame (x forward, y left, metres; the ``footprint``
field of the data's hazards). The vehicle is a disc of radius ``VEHICLE_HALF_WIDTH``
swept along the path from the origin through the waypoints; it crosses the hazard when a
point of the densified path lies inside the polygon or closer to its rim than the
half-width. The synthetic generator (``srdrl.data.scenes``) steers its clean trajectories
``VEHICLE_HALF_WIDTH`` plus a margin clear of the hazard in the way, so they pass this test.
"""

from __future__ import annotations

import numpy as np

VEHICLE_HALF_WIDTH = 0.9
"""Half-width of the vehicle footprint (metres) used by every crossing test."""


def _point_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule for points (M, 2) against a closed polygon (V, 2)."""
    x, y = points[:, :1], points[:, 1:]
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return np.sum(crosses & (x < x_at), axis=1) % 2 == 1


def _distance_to_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    a = polygon[None]  # (1, V, 2)
    b = np.roll(polygon, -1, axis=0)[None]
    p = points[:, None]  # (M, 1, 2)
    ab = b - a
    t = np.clip(np.sum((p - a) * ab, -1) / np.maximum(np.sum(ab * ab, -1), 1e-12), 0, 1)
    closest = a + t[..., None] * ab
    return np.min(np.linalg.norm(p - closest, axis=-1), axis=1)


def footprint_crosses(
    trajectory_xy: np.ndarray, polygon: np.ndarray, half_width: float = VEHICLE_HALF_WIDTH
) -> bool:
    """Whether a vehicle of ``half_width`` driving ``trajectory_xy`` (T, 2) enters ``polygon``.

    The path is densified between waypoints so that fast motion cannot step over a rim.
    """
    traj = np.asarray(trajectory_xy, dtype=np.float64)[:, :2]
    start = np.zeros((1, 2))
    path = np.concatenate([start, traj], axis=0)
    steps = np.linspace(0.0, 1.0, 5, endpoint=False)[None, :, None]
    dense = (path[:-1, None] + steps * (path[1:, None] - path[:-1, None])).reshape(-1, 2)
    dense = np.concatenate([dense, traj[-1:]], axis=0)
    inside = _point_in_polygon(dense, polygon)
    return bool(np.any(inside) or np.any(_distance_to_polygon(dense, polygon) < half_width))
