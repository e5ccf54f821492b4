"""Unicycle acceleration/curvature action space (the Alpamayo-R1 release's).

An action is (..., 64, 2): per-step longitudinal acceleration a_t (m/s^2) and path curvature
kappa_t (1/m), each normalised by the release's mean and std. ``action_to_traj`` integrates
a unicycle from the current speed v0 in the ego frame at t0 (x forward, y left, z up; pose
at the origin with heading 0), dt = 0.1 s:

    v_{t+1}     = v_t + a_t dt
    theta_{t+1} = theta_t + kappa_t (v_t dt + a_t dt^2 / 2)     (kappa times the arc length)
    p_{t+1}     = p_t + dt/2 (v_t u(theta_t) + v_{t+1} u(theta_{t+1})),  u = (cos, sin)

and returns the waypoints p_1..p_64 (..., 64, 3) with z = 0. Everything is a cumulative sum,
so it is batched over any leading dims and differentiable.

``traj_to_action`` is its regularised inverse, used to turn a ground-truth or candidate
trajectory into a flow-matching target. With z = (a / std_a, kappa / std_kappa) the
physical controls in std units (the normalised action is z - mean / std), it minimises, per
sample,

    sum_n ||p_n(z) - p*_n||^2 + w_a ||D z_a||^2 + w_k ||D z_kappa||^2 + w_0 ||z||^2

(metres squared; D the first difference along time; w_a = 1e-3, w_k = 3e-4, w_0 = 1e-6) by
Levenberg-Marquardt: Gauss-Newton on an analytic Jacobian with per-sample damping and step
acceptance, float64, a fixed 8 iterations of one batched Cholesky solve of the 128 x 128
normal equations each. The first three iterations weight the smoothness 1000x, 100x, 10x
(continuation), which keeps jittery targets out of poor local minima. The penalties decide
what the positions cannot: the curvature while the vehicle stands still (v = 0 does not
move the path) and the last steps' controls, which barely reach p_64. The ridge is centred
on physical zero, so straight constant-speed driving inverts to exactly a = kappa = 0. The
start is a finite-difference estimate of speed and heading from the target.

At about 450 lines this module is longer than most: the rollout, its Jacobian and the
inverse that solves through them are one model and are kept together.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from srdrl.timegrid import DT, NUM_STEPS

ACCEL_MEAN = 0.02902694707164455
ACCEL_STD = 0.6810426736454882
CURVATURE_MEAN = 0.0002692167976330542
CURVATURE_STD = 0.026148280660833106
ACTION_MEAN = (ACCEL_MEAN, CURVATURE_MEAN)
ACTION_STD = (ACCEL_STD, CURVATURE_STD)

ACCEL_LIMIT = 4.0
"""|a| bound (m/s^2), about 0.4 g, 5.8 release std: harder braking or launching than a
vehicle on loose ground manages."""
CURVATURE_LIMIT = 0.2
"""|kappa| bound (1/m), a 5 m turning radius, 7.6 release std: tighter than a car steers."""

SMOOTH_ACCEL = 1e-3
"""Weight of the squared first differences of the normalised acceleration, against squared
position errors in m^2."""
SMOOTH_CURVATURE = 3e-4
"""Weight of the squared first differences of the normalised curvature. Lighter than the
acceleration's: a cosine lane change starts with a curvature step, which 1e-3 rounds off
by 2.3 cm at the worst waypoint, 3e-4 by 1.5 cm."""
RIDGE = 1e-6
"""Weight of the squared physical action in std units: keeps the normal equations regular
when the vehicle never moves."""
INVERSE_ITERATIONS = 8
"""Levenberg-Marquardt iterations of ``traj_to_action``."""
CONTINUATION_DECADES = 3
"""Iteration i of the inverse multiplies the smoothness weights by 10^max(0, 3 - i)."""

_V0_FIT_POSES = 5
"""``estimate_v0`` fits the distance travelled over at most this many of the latest poses."""


# ----------------------------------------------------------------------------- checks


def _check_steps(x: torch.Tensor, name: str, last_dims: tuple[int, ...], steps: int | None):
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[-1] not in last_dims:
        want = " or ".join(str(d) for d in last_dims)
        raise ValueError(f"{name} must be (..., T, {want}), got shape {tuple(x.shape)}")
    if steps is not None and x.shape[-2] != steps:
        raise ValueError(f"{name} must have {steps} steps in dim -2, got shape {tuple(x.shape)}")


def _stats(like: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.as_tensor(mean, dtype=like.dtype, device=like.device)
    std = torch.as_tensor(std, dtype=like.dtype, device=like.device)
    return mean, std


# ----------------------------------------------------------------------------- normalisation


def normalize_action(
    action: torch.Tensor,
    mean: Sequence[float] | torch.Tensor = ACTION_MEAN,
    std: Sequence[float] | torch.Tensor = ACTION_STD,
) -> torch.Tensor:
    """Physical (..., 2) (m/s^2, 1/m) -> normalised."""
    mean, std = _stats(action, mean, std)
    return (action - mean) / std


def denormalize_action(
    action: torch.Tensor,
    mean: Sequence[float] | torch.Tensor = ACTION_MEAN,
    std: Sequence[float] | torch.Tensor = ACTION_STD,
) -> torch.Tensor:
    """Normalised (..., 2) -> physical (m/s^2, 1/m)."""
    mean, std = _stats(action, mean, std)
    return action * std + mean


def action_bounds(
    mean: Sequence[float] | torch.Tensor = ACTION_MEAN,
    std: Sequence[float] | torch.Tensor = ACTION_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds (2,) of a normalised action: |a| <= ACCEL_LIMIT,
    |kappa| <= CURVATURE_LIMIT, expressed in normalised units, float64."""
    limit = torch.tensor([ACCEL_LIMIT, CURVATURE_LIMIT], dtype=torch.float64)
    mean, std = _stats(limit, mean, std)
    return (-limit - mean) / std, (limit - mean) / std


def action_in_bounds(
    action: torch.Tensor,
    mean: Sequence[float] | torch.Tensor = ACTION_MEAN,
    std: Sequence[float] | torch.Tensor = ACTION_STD,
) -> torch.Tensor:
    """Bool mask (..., 64, 2): which normalised actions respect the physical limits.
    ``mask.float().mean()`` is the in-bounds fraction evaluation reports."""
    _check_steps(action, "action", (2,), None)
    low, high = (b.to(action.device, action.dtype) for b in action_bounds(mean, std))
    return (action >= low) & (action <= high)


# ----------------------------------------------------------------------------- forward model


def _rollout(accel: torch.Tensor, curvature: torch.Tensor, v0: torch.Tensor):
    """Unicycle integration of physical controls (..., T) from speed v0 (...).

    Returns node speeds v (..., T+1), step arc lengths ds (..., T), node headings
    theta (..., T+1) and waypoints xy (..., T, 2) (p_1..p_T; p_0 = 0 is left out).
    """
    v0 = v0.unsqueeze(-1)
    v = torch.cat([v0, v0 + DT * torch.cumsum(accel, -1)], -1)
    ds = v[..., :-1] * DT + accel * (DT * DT / 2)
    theta = torch.cumsum(curvature * ds, -1)
    theta = torch.cat([torch.zeros_like(theta[..., :1]), theta], -1)
    velocity = v.unsqueeze(-1) * torch.stack([theta.cos(), theta.sin()], -1)  # (..., T+1, 2)
    xy = torch.cumsum((DT / 2) * (velocity[..., :-1, :] + velocity[..., 1:, :]), -2)
    return v, ds, theta, xy


def _broadcast_v0(v0, batch_shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    v0 = torch.as_tensor(v0, dtype=like.dtype, device=like.device)
    try:
        return torch.broadcast_to(v0, batch_shape)
    except RuntimeError as err:
        raise ValueError(
            f"v0 of shape {tuple(v0.shape)} does not broadcast to the batch shape "
            f"{tuple(batch_shape)} of the trajectory/action"
        ) from err


def action_to_traj(
    action: torch.Tensor,
    v0: torch.Tensor | float,
    mean: Sequence[float] | torch.Tensor = ACTION_MEAN,
    std: Sequence[float] | torch.Tensor = ACTION_STD,
) -> torch.Tensor:
    """Normalised actions (..., 64, 2) and speed v0 (...) (m/s) -> waypoints (..., 64, 3),
    ego frame at t0, z = 0. Differentiable in both arguments; keeps the action's dtype."""
    _check_steps(action, "action", (2,), NUM_STEPS)
    physical = denormalize_action(action, mean, std)
    v0 = _broadcast_v0(v0, action.shape[:-2], action)
    _, _, _, xy = _rollout(physical[..., 0], physical[..., 1], v0)
    return torch.cat([xy, torch.zeros_like(xy[..., :1])], -1)


# ----------------------------------------------------------------------------- speed estimate


@functools.cache
def _derivative_weights(m: int) -> tuple[float, ...]:
    """Weights w (m,) with sum_i w_i s(t_i) the derivative at t = 0 of the least-squares
    polynomial (degree min(2, m - 1)) through samples at t = -(m-1) dt .. 0. Computed once
    on the CPU, so no device runs a pseudo-inverse per call."""
    t = torch.arange(-(m - 1), 1, dtype=torch.float64) * DT
    vandermonde = torch.stack([t**i for i in range(min(2, m - 1) + 1)], -1)  # (m, degree+1)
    return tuple(torch.linalg.pinv(vandermonde)[1].tolist())


def estimate_v0(history_xyz: torch.Tensor) -> torch.Tensor:
    """Current speed (...) (m/s) from past poses (..., H, 2|3) at 10 Hz ending at the origin.

    Takes the last m = min(H, 5) poses, measures the distance travelled along them (summed
    chords, counted back from the origin: s(0) = 0, s(-dt) = -|p_0 - p_-1|, ...), fits s(t)
    by least squares with a quadratic (a line when m = 2) and returns ds/dt at t = 0. That is
    exact for constant acceleration, near exact on curves (chords, unlike the position
    vector, do not bend with the path: 0.07 m/s better on a 10 m radius at 8 m/s than fitting
    x and y), and averages some pose noise. With H = 2 it is the last displacement over dt,
    the mean speed of the last interval. Non-negative: the sign of travel is not inferred.
    """
    _check_steps(history_xyz, "history_xyz", (2, 3), None)
    m = min(history_xyz.shape[-2], _V0_FIT_POSES)
    if m < 2:
        raise ValueError(
            f"history_xyz needs at least 2 poses to estimate speed, got shape "
            f"{tuple(history_xyz.shape)}"
        )
    xy = history_xyz[..., -m:, :2].to(torch.float64)
    chord = (xy[..., 1:, :] - xy[..., :-1, :]).norm(dim=-1)  # (..., m-1), oldest first
    behind = torch.flip(torch.cumsum(torch.flip(chord, [-1]), -1), [-1])  # distance to origin
    s = torch.cat([-behind, torch.zeros_like(chord[..., :1])], -1)  # (..., m), s(0) = 0
    derivative_at_0 = torch.tensor(_derivative_weights(m), dtype=torch.float64, device=xy.device)
    speed = (s * derivative_at_0).sum(-1).clamp(min=0.0)
    out_dtype = history_xyz.dtype if history_xyz.is_floating_point() else torch.float32
    return speed.to(out_dtype)


# ----------------------------------------------------------------------------- inverse


def _tail_sums(q: torch.Tensor) -> torch.Tensor:
    """How node quantities q_t (B, T+1, C) reach the waypoints through the trapezoid rule.

    p_n = sum_{t<=n} W[n, t] v_t u(theta_t) with W = dt/2 at t = 0 and t = n, dt between;
    returns [b, n-1, c, s] = sum_{t>s} W[n, t] q[b, t, c] = dt (Q_n - Q_{s+1}) + dt/2 q_n
    for s < n, else 0, with Q_t = sum_{j<t} q_j: (B, T, C, T).
    """
    steps = q.shape[1] - 1
    prefix = torch.cumsum(q, 1)[:, :-1]  # Q_1..Q_T (B, T, C)
    at_waypoint = DT * prefix + (DT / 2) * q[:, 1:]  # indexed by n = 1..T
    out = at_waypoint.unsqueeze(-1) - DT * prefix.transpose(1, 2).unsqueeze(1)
    before_waypoint = torch.ones(steps, steps, dtype=torch.bool, device=q.device).tril()
    return out * before_waypoint[None, :, None, :]


def _jacobian(accel, curvature, v, ds, theta, std) -> torch.Tensor:
    """d xy / d (normalised a, normalised kappa): (B, T*2, 2T), rows (n, xy), columns
    (a_0..a_{T-1}, kappa_0..kappa_{T-1}). O(B T^2), from p_n = sum_t W[n, t] v_t u(theta_t),

    dv_t/da_s = dt [s<t];  dtheta_t/dkappa_j = ds_j [j<t];
    dtheta_t/da_s = dt^2 (K_t - K_{s+1} + kappa_s / 2) [s<t],  K_t = sum_{j<t} kappa_j.
    """
    batch, steps = accel.shape
    k_prefix = torch.cat([torch.zeros_like(curvature[:, :1]), torch.cumsum(curvature, -1)], -1)
    u = torch.stack([theta.cos(), theta.sin()], -1)  # (B, T+1, 2)
    du = v.unsqueeze(-1) * torch.stack([-theta.sin(), theta.cos()], -1)  # d(v u)/dtheta
    tails = _tail_sums(torch.cat([u, du, du * k_prefix.unsqueeze(-1)], -1))  # (B, T, 6, T)
    tail_u, tail_du, tail_du_k = tails[:, :, 0:2], tails[:, :, 2:4], tails[:, :, 4:6]
    k_offset = (k_prefix[:, 1:] - curvature / 2)[:, None, None, :]  # K_{s+1} - kappa_s / 2
    j_a = DT * tail_u + DT * DT * (tail_du_k - k_offset * tail_du)
    j_k = tail_du * ds[:, None, None, :]
    jac = torch.cat([j_a * std[0], j_k * std[1]], -1)  # (B, T, 2, 2T)
    return jac.reshape(batch, steps * 2, steps * 2)


def finite_difference_controls(xy: torch.Tensor, v0: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite-difference speed and heading of the target (B, T, 2) -> physical a, kappa.

    The start of ``traj_to_action``'s iterations, and the cheap screen of labels that
    ``srdrl.data.label_bounds`` runs before inverting any. A segment shorter than 5 cm
    (0.5 m/s) keeps the heading of the last longer one, so pose jitter while standing does
    not start it spinning.
    """
    points = torch.cat([torch.zeros_like(xy[:, :1]), xy], 1)  # (B, T+1, 2)
    seg = points[:, 1:] - points[:, :-1]
    length = seg.norm(dim=-1)  # (B, T)
    seg_speed = length / DT
    v = torch.cat([v0[:, None], (seg_speed[:, :-1] + seg_speed[:, 1:]) / 2, seg_speed[:, -1:]], 1)
    accel = (v[:, 1:] - v[:, :-1]) / DT
    moving = length > 0.05
    step = torch.arange(length.shape[1], device=xy.device).expand_as(length)
    last_moving = torch.cummax(torch.where(moving, step, 0), -1).values
    phi = torch.atan2(seg[..., 1], seg[..., 0]).gather(-1, last_moving)
    phi = phi * moving.gather(-1, last_moving)  # heading 0 until the first moving segment
    turn = torch.remainder(phi.diff(dim=-1) + math.pi, 2 * math.pi) - math.pi
    phi = torch.cat([phi[:, :1], phi[:, :1] + torch.cumsum(turn, -1)], 1)  # unwrapped
    mid = (phi[:, :-1] + phi[:, 1:]) / 2
    theta = torch.cat([torch.zeros_like(phi[:, :1]), mid, phi[:, -1:]], 1)  # (B, T+1) nodes
    curvature = theta.diff(dim=-1) * length / (length * length + 0.05**2)
    return accel, curvature


def _smoothness_penalty(steps: int, weights: tuple[float, float], ridge: float, dtype, device):
    """R (2T, 2T) with z^T R z = w_a ||D z_a||^2 + w_k ||D z_kappa||^2 + ridge ||z||^2."""
    d = torch.diff(torch.eye(steps, dtype=dtype, device=device), dim=0)  # (T-1, T)
    dtd = d.T @ d
    eye = torch.eye(steps, dtype=dtype, device=device)
    zero = torch.zeros_like(eye)
    r = torch.cat(
        [torch.cat([weights[0] * dtd, zero], 1), torch.cat([zero, weights[1] * dtd], 1)], 0
    )
    return r + ridge * torch.eye(2 * steps, dtype=dtype, device=device)


@torch.no_grad()
def traj_to_action(
    future_xyz: torch.Tensor,
    history_xyz: torch.Tensor | None = None,
    *,
    v0: torch.Tensor | float | None = None,
    mean: Sequence[float] | torch.Tensor = ACTION_MEAN,
    std: Sequence[float] | torch.Tensor = ACTION_STD,
    smooth_accel: float = SMOOTH_ACCEL,
    smooth_curvature: float = SMOOTH_CURVATURE,
    ridge: float = RIDGE,
    iterations: int = INVERSE_ITERATIONS,
) -> torch.Tensor:
    """Waypoints (..., 64, 2|3) in the ego frame at t0 -> normalised actions (..., 64, 2).

    The start speed is ``v0`` (...) when given (the history is then not read), else
    ``estimate_v0(history_xyz)`` with history (..., H, 2|3), H >= 2. Solved in
    float64 (see the module docstring); returns the dtype of ``future_xyz`` (float32 for
    integer input). Not differentiable: it makes training targets.
    """
    _check_steps(future_xyz, "future_xyz", (2, 3), NUM_STEPS)
    batch_shape = future_xyz.shape[:-2]
    if v0 is None:
        if history_xyz is None:
            raise ValueError("traj_to_action needs history_xyz or v0 to know the start speed")
        _check_steps(history_xyz, "history_xyz", (2, 3), None)
        if history_xyz.shape[:-2] != batch_shape:
            raise ValueError(
                f"history_xyz batch shape {tuple(history_xyz.shape[:-2])} differs from "
                f"future_xyz's {tuple(batch_shape)}"
            )
        v0 = estimate_v0(history_xyz)
    f64 = torch.float64
    target = future_xyz[..., :2].to(f64).reshape(-1, NUM_STEPS, 2)  # (B, T, 2) metres
    v0 = _broadcast_v0(v0, batch_shape, target).reshape(-1)  # (B,)
    mean, std = _stats(target, mean, std)
    penalty = _smoothness_penalty(
        NUM_STEPS, (smooth_accel, smooth_curvature), ridge, f64, target.device
    )

    # Unknowns z (B, 2T): the physical controls in std units, a first then kappa; the
    # normalised action is z - mean / std. Centring the penalty on physical zero makes
    # constant-speed straight driving its exact minimiser (mean is not zero).
    def residual_and_state(z):
        a, k = z[:, :NUM_STEPS] * std[0], z[:, NUM_STEPS:] * std[1]
        v, ds, theta, xy = _rollout(a, k, v0)
        return (xy - target).reshape(-1, NUM_STEPS * 2), (a, k, v, ds, theta)

    accel, curvature = finite_difference_controls(target, v0)
    z = torch.cat([accel / std[0], curvature / std[1]], -1)
    r, state = residual_and_state(z)
    damping = torch.full_like(z[:, 0], 1e-6)
    for i in range(iterations):
        # Continuation: the first steps are smoothed harder, which keeps them out of the poor
        # local minima a jittery target (standing still, noisy poses) otherwise offers.
        penalty_i = penalty * max(1.0, 10.0 ** (CONTINUATION_DECADES - i))
        cost = (r * r).sum(-1) + ((z @ penalty_i) * z).sum(-1)
        jac = _jacobian(*state, std)
        system = torch.baddbmm(penalty_i, jac.mT, jac)  # Gauss-Newton Hessian (B, 2T, 2T)
        gradient = (jac.mT @ r.unsqueeze(-1)).squeeze(-1) + z @ penalty_i
        diagonal = system.diagonal(dim1=1, dim2=2)
        diagonal.add_((damping * diagonal.mean(-1)).unsqueeze(-1))  # Levenberg-Marquardt
        chol, _ = torch.linalg.cholesky_ex(system)  # a failed factor gives NaN: rejected below
        z_new = z + torch.cholesky_solve(-gradient.unsqueeze(-1), chol).squeeze(-1)
        r_new, state_new = residual_and_state(z_new)
        cost_new = (r_new * r_new).sum(-1) + ((z_new @ penalty_i) * z_new).sum(-1)
        better = cost_new < cost  # per sample: take the step, or damp harder and retry
        z = torch.where(better[:, None], z_new, z)
        r = torch.where(better[:, None], r_new, r)
        state = tuple(
            torch.where(better[:, None], new, old)
            for new, old in zip(state_new, state, strict=True)
        )
        damping = torch.where(better, damping / 10, damping * 10).clamp(1e-12, 1e6)

    action = torch.stack([z[:, :NUM_STEPS], z[:, NUM_STEPS:]], -1) - mean / std  # (B, T, 2)
    out_dtype = future_xyz.dtype if future_xyz.is_floating_point() else torch.float32
    return action.reshape(*batch_shape, NUM_STEPS, 2).to(out_dtype)


# ----------------------------------------------------------------------------- module


class ActionSpace(nn.Module):
    """The action space as a parameter-free submodule (the policy's ``action_space``).

    ``mean``/``std`` are non-persistent float64 buffers: they follow ``.to(device)`` and stay
    out of the state dict, so checkpoints without them load strictly. The arithmetic uses the
    float64 values kept as Python floats, because casting the policy to bf16 (as DeepSpeed
    does) also casts buffers and would round the std to 3 digits.
    """

    def __init__(
        self,
        mean: Sequence[float] = ACTION_MEAN,
        std: Sequence[float] = ACTION_STD,
        smooth_accel: float = SMOOTH_ACCEL,
        smooth_curvature: float = SMOOTH_CURVATURE,
        iterations: int = INVERSE_ITERATIONS,
    ):
        super().__init__()
        self._mean = tuple(float(m) for m in mean)
        self._std = tuple(float(s) for s in std)
        f64 = torch.float64
        self.register_buffer("mean", torch.tensor(self._mean, dtype=f64), persistent=False)
        self.register_buffer("std", torch.tensor(self._std, dtype=f64), persistent=False)
        self.smooth_accel = smooth_accel
        self.smooth_curvature = smooth_curvature
        self.iterations = iterations

    def action_to_traj(self, action: torch.Tensor, v0: torch.Tensor | float) -> torch.Tensor:
        """(..., 64, 2) normalised, v0 (...) -> (..., 64, 3) waypoints."""
        return action_to_traj(action, v0, self._mean, self._std)

    def traj_to_action(
        self,
        future_xyz: torch.Tensor,
        history_xyz: torch.Tensor | None = None,
        v0: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """(..., 64, 2|3) waypoints -> (..., 64, 2) normalised actions."""
        return traj_to_action(
            future_xyz,
            history_xyz,
            v0=v0,
            mean=self._mean,
            std=self._std,
            smooth_accel=self.smooth_accel,
            smooth_curvature=self.smooth_curvature,
            iterations=self.iterations,
        )

    def estimate_v0(self, history_xyz: torch.Tensor) -> torch.Tensor:
        """(..., H, 2|3) history -> (...) speed, m/s."""
        return estimate_v0(history_xyz)

    def normalize(self, action: torch.Tensor) -> torch.Tensor:
        return normalize_action(action, self._mean, self._std)

    def denormalize(self, action: torch.Tensor) -> torch.Tensor:
        return denormalize_action(action, self._mean, self._std)

    def in_bounds(self, action: torch.Tensor) -> torch.Tensor:
        """(..., 64, 2) bool: inside the physical limits (see ``action_in_bounds``)."""
        return action_in_bounds(action, self._mean, self._std)
