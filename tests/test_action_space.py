"""The unicycle action space: shapes, exact cases, round trips, gradients, errors.

Trajectory families are written in closed form (arc length along a circle or a line, or a
lateral cosine ramp) and sampled at 10 Hz; histories are the same motion before t0, so the
start speed estimated from them is the true one.
"""

from __future__ import annotations

import math

import pytest
import torch

from srdrl import action_space as A
from srdrl.action_space import (
    ActionSpace,
    action_in_bounds,
    action_to_traj,
    denormalize_action,
    estimate_v0,
    normalize_action,
    traj_to_action,
)
from srdrl.timegrid import DT, NUM_STEPS

F64 = torch.float64
T_FUTURE = torch.arange(1, NUM_STEPS + 1, dtype=F64) * DT  # (64,) s
T_HISTORY = torch.arange(-15, 1, dtype=F64) * DT  # (16,) s, ends at t0


def _along(s: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Arc length s (n, k) along a circle of signed radius (n,) (+ left, inf straight) through
    the origin with heading 0 -> (n, k, 3) ego-frame points."""
    r = radius[:, None]
    straight = torch.isinf(r)
    x = torch.where(straight, s, r * torch.sin(s / r))
    y = torch.where(straight, torch.zeros_like(s), r * (1 - torch.cos(s / r)))
    return torch.stack([x, y, torch.zeros_like(x)], -1)


def _speeds(g: torch.Generator, n: int) -> torch.Tensor:
    return 3 + 5 * torch.rand(n, generator=g, dtype=F64)  # v0 in [3, 8] m/s


def _pick(values: list[float], n: int) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)[torch.arange(n) % len(values)]


def arcs(g, n):
    """Constant speed on circles of 10..300 m either way, and straight."""
    v = _speeds(g, n)
    radius = _pick([10.0, -15.0, 25.0, -50.0, 100.0, -300.0, math.inf], n)
    return _along(v[:, None] * T_FUTURE, radius), _along(v[:, None] * T_HISTORY, radius), v


def lane_changes(g, n):
    """Constant forward speed, lateral cosine ramp of 1.5..2.5 m over 10..20 m, either way."""
    v = _speeds(g, n)
    offset = (1.5 + torch.rand(n, generator=g, dtype=F64)) * _pick([1.0, -1.0], n)
    length = 10 + 10 * torch.rand(n, generator=g, dtype=F64)
    start = 5 * torch.rand(n, generator=g, dtype=F64)
    x = v[:, None] * T_FUTURE
    ramp = ((x - start[:, None]) / length[:, None]).clamp(0, 1)
    y = offset[:, None] / 2 * (1 - torch.cos(math.pi * ramp))
    future = torch.stack([x, y, torch.zeros_like(x)], -1)
    return future, _along(v[:, None] * T_HISTORY, _pick([math.inf], n)), v


def stops(g, n):
    """Braking to a standstill in 2.5..5 s (constant deceleration up to 3.2 m/s^2, or cosine),
    then standing, on a line or a circle: the curvature while standing is the ill-posed part."""
    v = _speeds(g, n)
    t_stop = (2.5 + 2.5 * torch.rand(n, generator=g, dtype=F64))[:, None]
    radius = _pick([math.inf, 30.0, -20.0], n)
    t = T_FUTURE.expand(n, -1).clamp(max=t_stop)
    s_linear = v[:, None] * (t - t * t / (2 * t_stop))
    s_cosine = v[:, None] / 2 * (t + t_stop / math.pi * torch.sin(math.pi * t / t_stop))
    s = torch.where((torch.arange(n) % 2 == 0)[:, None], s_cosine, s_linear)
    return _along(s, radius), _along(v[:, None] * T_HISTORY, radius), v


def accelerations(g, n):
    """Constant acceleration 0.5..2 m/s^2 since before the history, on lines and circles."""
    v = _speeds(g, n)
    accel = (0.5 + 1.5 * torch.rand(n, generator=g, dtype=F64))[:, None]
    radius = _pick([math.inf, 40.0, -80.0], n)

    def s(t):
        return v[:, None] * t + accel * t * t / 2

    return _along(s(T_FUTURE), radius), _along(s(T_HISTORY), radius), v


FAMILIES = {"arcs": arcs, "lane_changes": lane_changes, "stops": stops, "accel": accelerations}


def smooth_actions(g, n):
    """Random low-frequency normalised actions (three cosines per channel, |x| <~ 1.5)."""
    step = torch.arange(NUM_STEPS, dtype=F64)[:, None, None] / NUM_STEPS  # (T, 1, 1)
    freq = torch.arange(1, 4, dtype=F64)[:, None]  # (3, 1)
    amplitude = 0.5 * torch.randn(n, 1, 3, 2, generator=g, dtype=F64) / freq
    phase = 2 * math.pi * torch.rand(n, 1, 3, 2, generator=g, dtype=F64)
    return (amplitude * torch.cos(math.pi * freq * step + phase)).sum(-2)  # (n, T, 2)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("batch", [(), (3,), (2, 5)], ids=["none", "3", "2x5"])
def test_shapes_over_leading_dims(batch):
    g = torch.Generator().manual_seed(0)
    action = torch.randn(*batch, NUM_STEPS, 2, generator=g)
    v0 = 3 + torch.rand(batch, generator=g)
    traj = action_to_traj(action, v0)
    assert traj.shape == (*batch, NUM_STEPS, 3) and traj.dtype == torch.float32
    assert torch.all(traj[..., 2] == 0)
    history = torch.randn(*batch, 16, 3, generator=g)
    assert estimate_v0(history).shape == batch
    back = traj_to_action(traj, history)
    assert back.shape == (*batch, NUM_STEPS, 2) and back.dtype == torch.float32
    assert traj_to_action(traj[..., :2], v0=v0).shape == (*batch, NUM_STEPS, 2)
    assert action_to_traj(action, 5.0).shape == traj.shape  # scalar v0 broadcasts
    assert action_in_bounds(action).shape == action.shape


def test_module_matches_functions_and_has_no_state():
    space = ActionSpace()
    assert list(space.parameters()) == [] and space.state_dict() == {}
    assert {name for name, _ in space.named_buffers()} == {"mean", "std"}
    g = torch.Generator().manual_seed(1)
    action, v0 = torch.randn(4, NUM_STEPS, 2, generator=g), 3 + torch.rand(4, generator=g)
    traj = action_to_traj(action, v0)
    space.to(torch.bfloat16)  # as a bf16 policy would be: must not round the statistics
    torch.testing.assert_close(space.action_to_traj(action, v0), traj)
    torch.testing.assert_close(space.traj_to_action(traj, v0=v0), traj_to_action(traj, v0=v0))
    history = _along(v0.double()[:, None] * T_HISTORY, _pick([math.inf], 4))
    torch.testing.assert_close(space.estimate_v0(history), v0.double())
    torch.testing.assert_close(space.denormalize(space.normalize(action)), action)


def test_normalisation_and_bounds():
    physical = torch.tensor([[A.ACCEL_MEAN, A.CURVATURE_MEAN]], dtype=F64)
    torch.testing.assert_close(normalize_action(physical), torch.zeros(1, 2, dtype=F64))
    x = torch.randn(7, 2, dtype=F64)
    torch.testing.assert_close(normalize_action(denormalize_action(x)), x)
    low, high = A.action_bounds()
    torch.testing.assert_close(denormalize_action(high), torch.tensor([4.0, 0.2], dtype=F64))
    torch.testing.assert_close(denormalize_action(low), torch.tensor([-4.0, -0.2], dtype=F64))
    action = torch.zeros(NUM_STEPS, 2)
    action[3, 0], action[5, 1] = high[0] + 0.01, low[1] - 0.01
    mask = action_in_bounds(action)
    assert (~mask).nonzero().tolist() == [[3, 0], [5, 1]]


# ----------------------------------------------------------------------------- forward model


def test_forward_matches_explicit_step_loop():
    """The cumsum form against the recurrences of docs/DESIGN.md written one step at a time."""
    g = torch.Generator().manual_seed(2)
    action, v0 = smooth_actions(g, 3), 3 + 5 * torch.rand(3, generator=g, dtype=F64)
    a, k = denormalize_action(action).unbind(-1)
    v, theta, p = v0.clone(), torch.zeros(3, dtype=F64), torch.zeros(3, 2, dtype=F64)
    expected = []
    for t in range(NUM_STEPS):
        v_next = v + a[:, t] * DT
        theta_next = theta + k[:, t] * (v * DT + a[:, t] * DT * DT / 2)
        p = p + DT / 2 * (
            v[:, None] * torch.stack([theta.cos(), theta.sin()], -1)
            + v_next[:, None] * torch.stack([theta_next.cos(), theta_next.sin()], -1)
        )
        expected.append(p)
        v, theta = v_next, theta_next
    torch.testing.assert_close(action_to_traj(action, v0)[..., :2], torch.stack(expected, 1))


def test_gradcheck_action_to_traj():
    g = torch.Generator().manual_seed(3)
    action = (0.5 * torch.randn(2, NUM_STEPS, 2, generator=g, dtype=F64)).requires_grad_()
    v0 = (3 + torch.rand(2, generator=g, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(action_to_traj, (action, v0))


def test_analytic_jacobian_matches_autograd():
    """The inverse's Jacobian (suffix-sum form) against autograd through the rollout."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 2 * NUM_STEPS, generator=g, dtype=F64)
    v0 = 3 + 5 * torch.rand(3, generator=g, dtype=F64)
    std = torch.tensor(A.ACTION_STD, dtype=F64)
    a, k = z[:, :NUM_STEPS] * std[0], z[:, NUM_STEPS:] * std[1]
    v, ds, theta, _ = A._rollout(a, k, v0)
    jac = A._jacobian(a, k, v, ds, theta, std)
    for b in range(3):

        def xy(zb, b=b):
            rollout = A._rollout(zb[:NUM_STEPS] * std[0], zb[NUM_STEPS:] * std[1], v0[b])
            return rollout[3].reshape(-1)

        expected = torch.autograd.functional.jacobian(xy, z[b])
        torch.testing.assert_close(jac[b], expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- inverse


@pytest.mark.parametrize("dtype,atol", [(F64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_straight_constant_speed_is_zero_action(dtype, atol):
    v = torch.tensor([0.5, 1.0, 3.0, 5.5, 8.0, 15.0], dtype=F64)
    radius = _pick([math.inf], len(v))
    future = _along(v[:, None] * T_FUTURE, radius).to(dtype)
    history = _along(v[:, None] * T_HISTORY, radius).to(dtype)
    physical = denormalize_action(traj_to_action(future, history).double())
    torch.testing.assert_close(physical, torch.zeros_like(physical), rtol=0, atol=atol)


def test_estimate_v0():
    g = torch.Generator().manual_seed(5)
    for family in FAMILIES.values():
        _, history, v = family(g, 16)
        # Chords, not arcs: 2e-3 m/s short of the speed on a 10 m circle at 8 m/s.
        torch.testing.assert_close(estimate_v0(history.float()).double(), v, rtol=0, atol=3e-3)
    line = _along(torch.tensor([[-0.7, 0.0]], dtype=F64), _pick([math.inf], 1))
    torch.testing.assert_close(estimate_v0(line), torch.tensor([7.0], dtype=F64))  # 2 poses


@pytest.mark.parametrize("family", list(FAMILIES), ids=list(FAMILIES))
def test_round_trip_traj_action_traj(family):
    """float32 GT -> action -> positions within 2 cm mean and 3 cm at the worst waypoint
    (measured: 0.2 cm mean / 1.5 cm max at most, the lane change's curvature step)."""
    future, history, v = FAMILIES[family](torch.Generator().manual_seed(6), 24)
    action = traj_to_action(future.float(), history.float())
    assert torch.isfinite(action).all()
    in_bounds = action_in_bounds(action)
    # The curvature stays tame even while standing; a braking profile that ends in a step
    # (constant deceleration, then none) may overshoot |a| = 4 m/s^2 in the step it stops.
    assert in_bounds[..., 1].all() and in_bounds.float().mean() > 0.99
    v0 = estimate_v0(history.float())
    error = (action_to_traj(action.double(), v0.double()) - future).norm(dim=-1)  # (n, T) m
    print(f"{family}: round trip mean {100 * error.mean():.3f} cm, max {100 * error.max():.3f} cm")
    assert error.mean() < 0.02 and error.max() < 0.03


def test_standing_still_with_pose_jitter_stays_finite():
    """At v = 0 the curvature does not move the path; the penalties must keep it tame even
    when the poses jitter by 1 cm around a vehicle that never moves."""
    g = torch.Generator().manual_seed(7)
    future = 0.01 * torch.randn(8, NUM_STEPS, 3, generator=g, dtype=F64)
    action = traj_to_action(future, v0=torch.zeros(8, dtype=F64))
    assert torch.isfinite(action).all() and action_in_bounds(action).all()
    error = (action_to_traj(action, 0.0) - future)[..., :2].norm(dim=-1)
    assert error.max() < 0.05  # no better than the jitter, and no wandering off


def test_round_trip_action_traj_action():
    """Smooth random actions -> positions -> actions. Asserted: the re-rolled positions
    within 5 mm; the actions within 0.02 std on average and 0.1 std on every step but the
    last 8, which barely move p_64 and are decided by the smoothness penalty instead."""
    g = torch.Generator().manual_seed(8)
    action = smooth_actions(g, 32)
    v0 = 3 + 5 * torch.rand(32, generator=g, dtype=F64)
    traj = action_to_traj(action, v0)
    back = traj_to_action(traj.float(), v0=v0.float()).double()
    assert (action_to_traj(back, v0) - traj).norm(dim=-1).max() < 5e-3
    difference = (back - action).abs()
    assert difference.mean() < 0.02
    assert difference[:, : NUM_STEPS - 8].max() < 0.1


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call",
    [
        lambda: action_to_traj(torch.zeros(NUM_STEPS, 3), 1.0),
        lambda: action_to_traj(torch.zeros(NUM_STEPS - 1, 2), 1.0),
        lambda: action_to_traj(torch.zeros(2), 1.0),
        lambda: action_to_traj(torch.zeros(2, NUM_STEPS, 2), torch.ones(3)),
        lambda: traj_to_action(torch.zeros(NUM_STEPS, 4), v0=1.0),
        lambda: traj_to_action(torch.zeros(NUM_STEPS + 1, 3), v0=1.0),
        lambda: traj_to_action(torch.zeros(NUM_STEPS, 3)),
        lambda: traj_to_action(torch.zeros(2, NUM_STEPS, 3), torch.zeros(3, 16, 3)),
        lambda: traj_to_action(torch.zeros(NUM_STEPS, 3), torch.zeros(16, 1)),
        lambda: estimate_v0(torch.zeros(1, 3)),
        lambda: action_in_bounds(torch.zeros(NUM_STEPS, 3)),
    ],
    ids=[
        "action-last-3",
        "action-63-steps",
        "action-1d",
        "v0-not-broadcast",
        "future-last-4",
        "future-65-steps",
        "no-history-no-v0",
        "history-batch",
        "history-last-1",
        "history-1-pose",
        "bounds-last-3",
    ],
)
def test_bad_shapes_raise(call):
    with pytest.raises(ValueError):
        call()
