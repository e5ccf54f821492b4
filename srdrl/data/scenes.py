"""Synthetic off-road scene layouts: track, hazards, trajectories and reasoning.

A scene lives in the ego frame at t0 (x forward, y left, metres) on the ground plane z = 0.
A dirt track follows the centreline y = curvature * x^2 / 2 with a half-width of 3.6-4.5 m;
rough shoulders lie outside it. Up to one hazard lies *in the way* (covering the
centreline from one side or across the whole track, its near edge ``HAZARD_NEAR`` ahead)
and up to one lies on a shoulder as a distractor. The ranges are chosen for the generated
data's camera (srdrl/data/synthetic.py): a hazard is near and large enough to fill several
patches of the tiny policy's input. The clean trajectory keeps to the track and passes an
in-the-way hazard with a smooth lateral manoeuvre on the free side, or brakes to a stop
before a blocking one. A noisy label drives straight along the centreline at constant
speed, through the hazard, while the reasoning stays correct. The reasoning states only
what the t0 frame shows (see "reasoning" below).

Everything here is NumPy and deterministic in the generator passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from srdrl.footprint import VEHICLE_HALF_WIDTH
from srdrl.timegrid import DT, HORIZON_S
from srdrl.timegrid import HISTORY_STEPS as NUM_HISTORY
from srdrl.timegrid import NUM_STEPS as NUM_FUTURE

MAX_LATERAL_ACCEL = 3.0
MAX_BRAKING = 3.0
HAZARD_KINDS = ("mud", "rocks", "water")
SPEED = (3.0, 8.0)
"""Range of the speed at t0, m/s."""
HAZARD_NEAR = (6.0, 16.0)
"""Range of an in-path hazard's near edge ahead of the vehicle, m: near enough to fill a
few image tokens of the tiny policy."""
SIDE_AXES = ((3.5, 6.0), (2.0, 3.0))
"""Ranges of a side hazard's semi-axes along and across the track, m."""
BLOCK_DEPTH = (3.0, 6.0)
"""Range of a blocking hazard's semi-axis along the track, m."""
DISTRACTOR_AXES = ((3.0, 6.0), (1.5, 2.5))
"""Ranges of a distractor's semi-axes along and across the track, m."""
DISTRACTOR_X = (18.0, 28.0)
"""Range of a distractor's centre ahead, m: far enough for the camera to see the shoulder."""
DISTRACTOR_GAP = (0.3, 1.2)
"""Range of the gap between the track edge and a distractor's rim, m."""


@dataclass
class Hazard:
    """An elliptical patch with a ragged rim: centre, semi-axes and rim harmonics."""

    kind: str
    centre: tuple[float, float]
    axes: tuple[float, float]
    rim_phase: tuple[float, float]
    in_path: bool
    blocking: bool = False

    def rim(self, theta: np.ndarray) -> np.ndarray:
        """Normalised rim radius at polar angle ``theta`` (1 is the plain ellipse)."""
        p1, p2 = self.rim_phase
        return 1.0 + 0.06 * np.sin(3 * theta + p1) + 0.04 * np.sin(5 * theta + p2)

    def contains(self, x: np.ndarray, y: np.ndarray, bounded: bool = False) -> np.ndarray:
        """Whether ground points (x, y) lie inside the hazard.

        ``bounded`` first discards points outside the bounding box (the rim reaches at most
        1.1 semi-axes), which is much faster when most points are far away.
        """
        if bounded:
            out = np.zeros(np.shape(x), dtype=bool)
            near = (np.abs(x - self.centre[0]) < 1.1 * self.axes[0]) & (
                np.abs(y - self.centre[1]) < 1.1 * self.axes[1])
            out[near] = self.contains(x[near], y[near])
            return out
        nx = (x - self.centre[0]) / self.axes[0]
        ny = (y - self.centre[1]) / self.axes[1]
        return np.hypot(nx, ny) < self.rim(np.arctan2(ny, nx))

    def footprint(self, num_vertices: int = 48) -> np.ndarray:
        """The rim as a closed polygon (V, 2), ego frame, counter-clockwise."""
        theta = np.linspace(0.0, 2 * np.pi, num_vertices, endpoint=False)
        r = self.rim(theta)
        return np.stack(
            [
                self.centre[0] + self.axes[0] * r * np.cos(theta),
                self.centre[1] + self.axes[1] * r * np.sin(theta),
            ],
            axis=-1,
        )

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "in_path": self.in_path,
            "blocking": self.blocking,
            "footprint": np.round(self.footprint(), 4).tolist(),
        }


@dataclass
class Scene:
    speed: float  # m/s at t0
    track_half_width: float
    curvature: float  # centreline y = curvature * x^2 / 2
    hazards: list[Hazard]
    intent: str  # "straight" | "right" | "left" | "stop"
    history: np.ndarray  # (16, 3) ego frame, ends at the origin
    clean_trajectory: np.ndarray  # (64, 3)
    noisy_trajectory: np.ndarray | None  # (64, 3), the straight-through label, if possible
    reasoning: str
    colour_gain: float = 1.0  # scene-wide illumination
    palette_jitter: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def centreline_y(self, x: np.ndarray) -> np.ndarray:
        return self.curvature * np.asarray(x) ** 2 / 2.0


def centreline_history(speed: float, curvature: float) -> np.ndarray:
    """16 poses at 10 Hz ending at the origin, driven along the centreline at ``speed``."""
    x = -speed * DT * np.arange(NUM_HISTORY - 1, -1, -1, dtype=np.float64)
    return np.stack([x, curvature * x**2 / 2.0, np.zeros_like(x)], axis=-1)


def _along_centreline(s: np.ndarray, curvature: float, lateral: np.ndarray) -> np.ndarray:
    """Waypoints (64, 3) at forward distances ``s`` with a lateral offset from the centreline."""
    return np.stack([s, curvature * s**2 / 2.0 + lateral, np.zeros_like(s)], axis=-1)


def _cosine_ramp(x: np.ndarray, start: float, length: float) -> np.ndarray:
    """0 before ``start``, 1 after ``start + length``, a half cosine in between."""
    u = np.clip((x - start) / max(length, 1e-6), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * u)


def ramp_length_for(speed: float, offset: float) -> float:
    """Shortest cosine ramp (metres) to shift by ``offset`` within the lateral-accel limit.

    A ramp y = A/2 (1 - cos(pi x / L)) has peak curvature A/2 (pi/L)^2, so the lateral
    acceleration v^2 A pi^2 / (2 L^2) stays under the limit for L >= pi v sqrt(A / 2 a).
    """
    return math.pi * speed * math.sqrt(abs(offset) / (2.0 * MAX_LATERAL_ACCEL))


def _times() -> np.ndarray:
    return DT * np.arange(1, NUM_FUTURE + 1, dtype=np.float64)


def constant_speed_trajectory(speed: float, curvature: float) -> np.ndarray:
    s = speed * _times()
    return _along_centreline(s, curvature, np.zeros_like(s))


def swerve_trajectory(
    speed: float, curvature: float, offset: float, near: float, far: float
) -> np.ndarray:
    """Shift laterally by ``offset`` before x = ``near`` and back after x = ``far``."""
    s = speed * _times()
    length = min(near - 1.0, max(ramp_length_for(speed, offset), 2.0 * speed))
    up = _cosine_ramp(s, near - 1.0 - length, length)
    down = 1.0 - _cosine_ramp(s, far + 1.0, length)
    return _along_centreline(s, curvature, offset * np.minimum(up, down))


def stopping_trajectory(speed: float, curvature: float, stop_at: float) -> np.ndarray:
    """Brake at a constant rate from t0 to stand still at x = ``stop_at``."""
    decel = speed**2 / (2.0 * stop_at)
    t = np.minimum(_times(), speed / decel)
    s = speed * t - 0.5 * decel * t**2
    return _along_centreline(s, curvature, np.zeros_like(s))


# --------------------------------------------------------------------------- reasoning

# The reasoning says only what the t0 frame shows: whether a hazard is in the way, its
# kind (one word each, told apart by colour and texture), the side of the track it covers
# or lies beside, and what to do about it. No distances: the frame cannot give metres. Each
# template opens with its own lead-in, so the word after it (a hazard kind, or what stands
# in for none) and the first side word are decided by the image alone.
_SWERVE = [
    "I see {kind} on the {hside} side of the track ahead; steer {go} to pass it.",
    "Ahead: {kind} on the {hside} half of the track, so I will keep {go}.",
    "Looking ahead, I spot {kind} over the {hside} side of the track. Move to the {go} and go "
    "around it.",
    "There is a patch of {kind} on the {hside} of the track. Shift {go} to avoid it, then "
    "continue straight.",
]
_STOP = [
    "I see {kind} across the whole track ahead; slow down and stop before it.",
    "Ahead: {kind} across the full width of the track. Brake and come to a stop.",
    "Looking ahead, I spot {kind} blocking the whole track, so slow down to a halt.",
    "There is a patch of {kind} across the full track with no way around. Stop before "
    "reaching it.",
]
_DISTRACTOR = [
    "I see {kind} off to the {hside} of the track, clear of our path; keep straight.",
    "Ahead: {kind} beyond the {hside} edge of the track, not in the way. Continue straight.",
    "Looking ahead, I spot {kind} on the {hside} shoulder, which does not block the track; "
    "stay on course.",
    "There is a patch of {kind} on the {hside} shoulder, outside the track. Keep going "
    "straight.",
]
_CLEAR = [
    "I see a clear dirt track ahead; keep straight.",
    "Ahead: the track is smooth and clear. Continue straight at a steady speed.",
    "Looking ahead, I spot nothing on the track; maintain course.",
    "There is a clear dirt road ahead, nothing in the way. Go straight.",
]


def _side_of(hazard: Hazard, curvature: float) -> str:
    """Which side of the centreline the hazard's centre lies on."""
    x, y = hazard.centre
    return "left" if y > curvature * x**2 / 2.0 else "right"


def reasoning_for(scene_intent: str, hazards: list[Hazard], curvature: float,
                  rng: np.random.Generator) -> str:
    """The reasoning for a scene: the in-path hazard if there is one, else the distractor,
    else the clear track; the template is drawn from ``rng``."""
    in_path = [h for h in hazards if h.in_path]
    beside = [h for h in hazards if not h.in_path]
    if in_path and scene_intent == "stop":
        options, h = _STOP, in_path[0]
    elif in_path:
        options, h = _SWERVE, in_path[0]
    elif beside:
        options, h = _DISTRACTOR, beside[0]
    else:
        return _CLEAR[rng.integers(len(_CLEAR))]
    template = options[rng.integers(len(options))]
    return template.format(kind=h.kind, hside=_side_of(h, curvature), go=scene_intent)


# --------------------------------------------------------------------------- sampling


def _rim_phase(rng: np.random.Generator) -> tuple[float, float]:
    return (float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi)))


def _sample_side_hazard(rng, speed, curvature, half_width):
    """A hazard covering the centreline from one side, and the swerve that clears it.

    The clearance is measured on the hazard's actual rim (relative to the bending
    centreline), so the clean path clears it by construction. Returns (hazard, clean
    trajectory, intent), or None when no placement fits this speed and track.
    """
    side = 1.0 if rng.random() < 0.5 else -1.0  # +1: hazard on the left
    ax, ay = rng.uniform(*SIDE_AXES[0]), rng.uniform(*SIDE_AXES[1])
    inner = rng.uniform(0.3, 0.9)  # the plain ellipse crosses the centreline by this much
    clearance = rng.uniform(0.45, 0.7)
    near = rng.uniform(*HAZARD_NEAR)
    xc = near + ax
    hazard = Hazard(
        kind=HAZARD_KINDS[rng.integers(3)],
        centre=(xc, curvature * xc**2 / 2.0 + side * (ay - inner)),
        axes=(ax, ay),
        rim_phase=_rim_phase(rng),
        in_path=True,
    )
    rim = hazard.footprint()
    reach = float(np.max(-side * (rim[:, 1] - curvature * rim[:, 0] ** 2 / 2.0)))
    offset = -side * (reach + VEHICLE_HALF_WIDTH + clearance)
    x_lo, x_hi = float(rim[:, 0].min()), float(rim[:, 0].max())
    fits = (
        reach >= 0.3
        and abs(offset) + VEHICLE_HALF_WIDTH <= half_width - 0.1
        and x_lo >= HAZARD_NEAR[0]
        and x_lo - 1.0 >= ramp_length_for(speed, offset)
        and xc <= HORIZON_S * speed - 1.0  # the straight-through label reaches its middle
    )
    if not fits:
        return None
    clean = swerve_trajectory(speed, curvature, offset, x_lo, x_hi)
    return hazard, clean, "right" if side > 0 else "left"


def _sample_blocking_hazard(rng, speed, curvature, half_width):
    ax = rng.uniform(*BLOCK_DEPTH)
    lo = max(HAZARD_NEAR[0], 3.0 + speed**2 / (2.0 * MAX_BRAKING))
    hi = min(HAZARD_NEAR[1], HORIZON_S * speed - 1.0)
    if lo > hi:
        return None
    near = rng.uniform(lo, hi)
    xc = near + ax
    hazard = Hazard(
        kind=HAZARD_KINDS[rng.integers(3)],
        centre=(xc, curvature * xc**2 / 2.0 + rng.uniform(-0.5, 0.5)),
        axes=(ax, half_width + rng.uniform(1.5, 3.0)),
        rim_phase=_rim_phase(rng),
        in_path=True,
        blocking=True,
    )
    clean = stopping_trajectory(speed, curvature, near - rng.uniform(2.0, 3.0))
    return hazard, clean, "stop"


def _sample_distractor(rng, curvature, half_width):
    side = 1.0 if rng.random() < 0.5 else -1.0
    ax, ay = rng.uniform(*DISTRACTOR_AXES[0]), rng.uniform(*DISTRACTOR_AXES[1])
    xc = rng.uniform(*DISTRACTOR_X)
    gap = rng.uniform(*DISTRACTOR_GAP)
    yc = curvature * xc**2 / 2.0 + side * (half_width + gap + 1.1 * ay)
    return Hazard(
        kind=HAZARD_KINDS[rng.integers(3)],
        centre=(xc, yc),
        axes=(ax, ay),
        rim_phase=_rim_phase(rng),
        in_path=False,
    )


def sample_scene(
    rng: np.random.Generator, p_in_path: float = 0.6, p_blocking: float = 0.25,
    p_distractor: float = 0.4,
) -> Scene:
    """Draw one scene: layout, clean and straight-through trajectories, reasoning."""
    half_width = rng.uniform(3.6, 4.5)
    curvature = rng.uniform(-0.003, 0.003)
    hazards: list[Hazard] = []
    intent = "straight"
    speed = rng.uniform(*SPEED)
    clean = constant_speed_trajectory(speed, curvature)
    noisy = None
    if rng.random() < p_in_path:
        blocking = rng.random() < p_blocking
        for attempt in range(200):  # rejection sampling: re-draw until a placement fits
            make = _sample_blocking_hazard if blocking else _sample_side_hazard
            placed = make(rng, speed, curvature, half_width)
            if placed is not None:
                hazard, clean, intent = placed
                hazards.append(hazard)
                noisy = constant_speed_trajectory(speed, curvature)
                break
            if attempt % 10 == 9:  # this speed rarely fits: try another
                speed = rng.uniform(*SPEED)
                clean = constant_speed_trajectory(speed, curvature)
    if rng.random() < p_distractor:
        hazards.append(_sample_distractor(rng, curvature, half_width))
    return Scene(
        speed=speed,
        track_half_width=half_width,
        curvature=curvature,
        hazards=hazards,
        intent=intent,
        history=centreline_history(speed, curvature),
        clean_trajectory=clean,
        noisy_trajectory=noisy,
        reasoning=reasoning_for(intent, hazards, curvature, rng),
        colour_gain=float(rng.uniform(0.85, 1.15)),
        palette_jitter=rng.normal(0.0, 6.0, size=3),
    )
