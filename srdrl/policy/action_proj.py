"""The action-in projection: noisy actions x_t (M, T, 2) and flow time t (M,) -> (M, T, hidden).

``PerWaypointActionInProj`` has the Alpamayo-R1 release's structure and parameter names
(its ``PerWaypointActionInProjV2``), so release tensors load by name:

- ``sinus.{i}`` for each action value and ``timestep_fourier_encoder`` for t: F frequencies
  f log-spaced over [min, max] (the release: 1 to 100; buffer ``freqs``, (1, F), saved with
  the weights like the release's), giving sqrt(2) [sin(2 pi f v), cos(2 pi f v)] (2F
  features);
- ``encoder.trunk``: Linear(in, h), SiLU, then per layer RMSNorm(h, 1e-5), Linear and SiLU,
  the last layer's Linear going to the output width without activation;
- ``norm``: LayerNorm over the output.

t enters only through its features, repeated at every waypoint; the waypoints are told
apart by the RoPE positions of their action tokens (see ``expert.py``). Features are
float32; the MLP runs in its weights' dtype (or autocast's).

``LegacyActionInProj`` is srdrl's first encoder, kept for checkpoints that predate the
release structure (``PolicyConfig.action_encoder = 'legacy'``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from srdrl.policy.config import PolicyConfig
from srdrl.policy.expert import RMSNorm


class FourierFeatures(nn.Module):
    """(...) -> (..., 2F): sqrt(2) [sin(2 pi f v), cos(2 pi f v)], f log-spaced in [lo, hi]."""

    def __init__(self, num_frequencies: int, min_frequency: float, max_frequency: float):
        super().__init__()
        freqs = torch.logspace(math.log10(min_frequency), math.log10(max_frequency),
                               num_frequencies)
        self.register_buffer("freqs", freqs[None, :])  # (1, F); persistent: release name

    @property
    def out_features(self) -> int:
        return 2 * self.freqs.shape[-1]

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        angle = v.float()[..., None] * self.freqs.float() * (2 * math.pi)  # (..., F)
        return torch.cat([angle.sin(), angle.cos()], -1) * math.sqrt(2)


class MLPEncoder(nn.Module):
    """``trunk``: Linear(in, h), SiLU, then ``num_layers`` x [RMSNorm(h), Linear, SiLU], the
    last Linear going to ``out_features`` with no SiLU after it."""

    def __init__(self, in_features: int, num_layers: int, hidden: int, out_features: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_features, hidden), nn.SiLU()]
        for i in range(num_layers):
            last = i == num_layers - 1
            layers += [RMSNorm(hidden, 1e-5), nn.Linear(hidden, out_features if last else hidden)]
            if not last:
                layers.append(nn.SiLU())
        self.trunk = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


class PerWaypointActionInProj(nn.Module):
    """(x_t (M, T, A), t (M,)) -> (M, T, out): the release's per-waypoint Fourier encoder."""

    def __init__(self, action_dim: int, out_features: int, num_layers: int, hidden: int,
                 num_frequencies: int, min_frequency: float, max_frequency: float):
        super().__init__()
        frequencies = (num_frequencies, min_frequency, max_frequency)
        self.sinus = nn.ModuleList(FourierFeatures(*frequencies) for _ in range(action_dim))
        self.timestep_fourier_encoder = FourierFeatures(*frequencies)
        in_features = (action_dim + 1) * self.timestep_fourier_encoder.out_features
        self.encoder = MLPEncoder(in_features, num_layers, hidden, out_features)
        self.norm = nn.LayerNorm(out_features)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows, steps, _ = x_t.shape
        action = torch.cat([enc(x_t[..., i]) for i, enc in enumerate(self.sinus)], -1)
        time = self.timestep_fourier_encoder(t).unsqueeze(1).expand(rows, steps, -1)  # (M, T, 2F)
        features = torch.cat([action, time], -1)  # (M, T, (A + 1) 2F) float32
        return self.norm(self.encoder(features.to(self.norm.weight.dtype)))


class LegacyActionInProj(nn.Module):
    """srdrl's first encoder: each action value v gives [v, sin(pi f v), cos(pi f v)] with
    f = 2^-3 .. 2^(F-4), t gives [sin(pi f t), cos(pi f t)] with f = 2^-1 .. 2^(F-2), then a
    two-layer SiLU MLP plus a learned embedding per waypoint."""

    def __init__(self, action_dim: int, num_waypoints: int, hidden: int, num_frequencies: int):
        super().__init__()
        powers = torch.arange(num_frequencies, dtype=torch.float32)
        # powers of two: exact in bf16 should the module be cast
        self.register_buffer("action_frequencies", 2.0 ** (powers - 3), persistent=False)
        self.register_buffer("time_frequencies", 2.0 ** (powers - 1), persistent=False)
        in_features = action_dim * (1 + 2 * num_frequencies) + 2 * num_frequencies
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.waypoint_embedding = nn.Parameter(torch.randn(num_waypoints, hidden) * 0.02)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows, steps, _ = x_t.shape
        x = x_t.float()
        angle = math.pi * x.unsqueeze(-1) * self.action_frequencies.float()  # (M, T, 2, F)
        action = torch.cat([x.unsqueeze(-1), angle.sin(), angle.cos()], -1).flatten(2)
        angle_t = math.pi * t.float().unsqueeze(-1) * self.time_frequencies.float()  # (M, F)
        time = torch.cat([angle_t.sin(), angle_t.cos()], -1)  # (M, 2F)
        features = torch.cat([action, time.unsqueeze(1).expand(rows, steps, -1)], -1)
        weight = self.mlp[0].weight
        return self.mlp(features.to(weight.dtype)) + self.waypoint_embedding.to(weight.dtype)


def build_action_in_proj(config: PolicyConfig) -> nn.Module:
    if config.action_encoder == "legacy":
        return LegacyActionInProj(config.action_dim, config.num_waypoints,
                                  config.expert_hidden_size, config.fourier_frequencies)
    return PerWaypointActionInProj(
        config.action_dim, config.expert_hidden_size, config.action_in_num_layers,
        config.action_in_width, config.fourier_frequencies, config.fourier_min_frequency,
        config.fourier_max_frequency)
