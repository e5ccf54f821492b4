"""Trajectory-level exploration noise for the RL candidates (docs/DESIGN.md, "The RL loss").

The sampler's start noise is per waypoint and the flow maps most of it back onto the
policy's mode, so its N samples rarely leave the label's mode. Here each sampled path
except the first (the policy's own) is changed as a whole, after sampling, with three
numbers per candidate (eps_x, eps_y, eps_o ~ N(0, 1)), in the spirit of the per-axis
multiplicative trajectory noise of DiffusionDriveV2:

    x' = x (1 + scale_std eps_x)                      (travels further or less: speed)
    y' = y (1 + scale_std eps_y) + offset_std eps_o r_k   (a swerve, smooth in time)

with r_k = (1 - cos(pi min(k / RAMP_STEPS, 1))) / 2 for waypoint k = 1..64, a cosine ramp
from 0 to 1 over the first RAMP_STEPS steps, held after. The perturbed path is inverted
into actions (``traj_to_action``) and rolled out again, so the candidate that is scored is
exactly the one its action produces, and the AWR term trains toward that action. The
sampler's CUDA graph is untouched: this runs on its output.
"""

from __future__ import annotations

import math

import torch

from srdrl.policy.model import draw

RAMP_STEPS = 20
"""Waypoints (0.1 s each) over which the lateral offset ramps in: full offset after 2 s."""


def offset_ramp(num_waypoints: int, device=None) -> torch.Tensor:
    """r_k (num_waypoints,), k = 1..num_waypoints: a cosine ramp 0 -> 1 over RAMP_STEPS."""
    k = torch.arange(1, num_waypoints + 1, device=device, dtype=torch.float64)
    return (0.5 * (1.0 - torch.cos(math.pi * (k / RAMP_STEPS).clamp(max=1.0)))).float()


def perturb_paths(paths: torch.Tensor, eps: torch.Tensor, scale_std: float,
                  offset_std: float) -> torch.Tensor:
    """Paths (B, N, T, 3) with eps (B, N, 3) = (eps_x, eps_y, eps_o) -> perturbed paths;
    sample 0 of each scene is returned unchanged whatever its eps."""
    x, y, z = paths.unbind(-1)
    ramp = offset_ramp(paths.shape[-2], paths.device).to(paths.dtype)  # (T,)
    ex, ey, eo = (e[..., None].to(paths.dtype) for e in eps.unbind(-1))  # (B, N, 1)
    new = torch.stack([x * (1 + scale_std * ex), y * (1 + scale_std * ey)
                       + offset_std * eo * ramp, z], dim=-1)
    keep = torch.zeros(paths.shape[1], dtype=torch.bool, device=paths.device)
    keep[0] = True
    return torch.where(keep[None, :, None, None], paths, new)


@torch.no_grad()
def trajectory_noise(actions: torch.Tensor, trajs: torch.Tensor, history: torch.Tensor,
                     action_space, scale_std: float, offset_std: float, generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled actions (B, N, T, 2) and paths (B, N, T, 3) -> the explored candidates: the
    same for sample 0, perturbed (``perturb_paths``), inverted and rolled out again for the
    others. Draws (B * (N - 1), 3) numbers, scene-major, from ``generator`` (nothing when
    N = 1)."""
    batch, samples = trajs.shape[:2]
    if samples == 1:
        return actions, trajs
    eps = draw(torch.randn, (batch * (samples - 1), 3), generator, trajs.device)
    eps = torch.cat([eps.new_zeros(batch, 1, 3), eps.view(batch, samples - 1, 3)], dim=1)
    moved = perturb_paths(trajs, eps, scale_std, offset_std)[:, 1:]  # (B, N - 1, T, 3)
    v0 = action_space.estimate_v0(history.float())[:, None].expand(batch, samples - 1)
    new_actions = action_space.traj_to_action(moved, v0=v0).to(actions.dtype)
    new_trajs = action_space.action_to_traj(new_actions, v0).to(trajs.dtype)
    return (torch.cat([actions[:, :1], new_actions], dim=1),
            torch.cat([trajs[:, :1], new_trajs], dim=1))
