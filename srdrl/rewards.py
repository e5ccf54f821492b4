"""SRD-RL rewards: visual safety, label similarity, danger, reasoning alignment, trust gate.

Candidates per scene are scored together, ``(B, C, T, 3)`` in the ego frame with index 0
the labelled trajectory (docs/DESIGN.md, "Rewards and the trust gate"):

- safety: ``srdrl.kernels.path_safety`` over every candidate in one call;
- gt_sim = exp(-ADE(candidate, label) / 2);
- danger confidence = min(whole-word danger matches / 3, 1) in the reasoning;
- alignment: the intent the reasoning states (left / right / straight, slow / stop),
  scored against each candidate's own motion, never against the label;
- trust gate: the label's weight falls from gt_trust_max toward gt_trust_min with the
  danger confidence when the reasoning names a danger (confidence >= danger_threshold)
  and the label's own path looks unsafe (safety < unsafe_threshold, or with
  trust_gate_mode 'relative' the best sample is safer by more than gate_safety_margin);
- reward = w_safety * safety + w_gt * gt_weight * gt_sim + w_reasoning * alignment.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from srdrl.action_space import estimate_v0
from srdrl.config import RewardConfig
from srdrl.kernels import path_safety
from srdrl.timegrid import DT

DANGER_WORDS = (
    "mud", "rock", "rocks", "stone", "stones", "obstacle", "danger", "unsafe", "rough",
    "bump", "water", "puddle", "avoid", "detour", "slippery", "uneven", "hazard",
)
_DANGER = re.compile(r"\b(?:" + "|".join(DANGER_WORDS) + r")\b", re.IGNORECASE)


def danger_confidence(text: str) -> float:
    """min(number of whole-word, case-insensitive danger-word matches / 3, 1)."""
    return min(len(_DANGER.findall(text)) / 3.0, 1.0)


# --------------------------------------------------------------------------- intent

# An intent is an instruction: a motion verb, a few filler words, then the direction.
# A location ("mud on the left", "the left side is blocked") has no motion verb in front
# of its direction word, so it is not an intent.
_VERB = (r"(?:steer|mov|keep|shift|nudg|swerv|veer|go|turn|stay|pass|detour|bear|head|driv"
         r"|pull|edg|hug)\w*")
_FILLER = r"(?:it|over|slightly|a|bit|little|gently|well|around|to|the|on|towards?|further|more)"
_LATERAL = re.compile(rf"\b{_VERB}(?:\s+{_FILLER})*\s+(left|right)\b", re.IGNORECASE)
_STRAIGHT = re.compile(
    r"\b(?:keep|go|continu|driv|stay|head|proceed|carry)\w*\s+(?:on\s+)?(?:going\s+)?straight\b"
    r"|\bmaintain\w*\s+(?:the\s+|our\s+)?(?:course|heading|line)\b"
    r"|\bstay\w*\s+on\s+(?:course|track|the\s+track)\b",
    re.IGNORECASE,
)
_STOP = re.compile(r"\b(?:stop|stopping|halt|standstill)\b", re.IGNORECASE)
_SLOW = re.compile(r"\b(?:slow\w*|brak\w*|decelerat\w*|reduc\w*\s+(?:the\s+)?speed|ease\s+off)\b",
                   re.IGNORECASE)
_NEGATION = re.compile(r"\b(?:no\s+need\s+to|not|don't|do\s+not|never|without)\s+(?:\w+\s+)?$",
                       re.IGNORECASE)


@dataclass(frozen=True)
class Intent:
    lateral: str | None  # "left" | "right" | "straight" | None
    longitudinal: str | None  # "slow" | "stop" | None

    @property
    def stated(self) -> bool:
        return self.lateral is not None or self.longitudinal is not None


def _affirmed(pattern: re.Pattern, text: str) -> list[re.Match]:
    return [m for m in pattern.finditer(text) if not _NEGATION.search(text[: m.start()])]


@functools.lru_cache(maxsize=4096)
def parse_intent(text: str) -> Intent:
    """The manoeuvre the reasoning asks for. The last affirmed instruction wins."""
    lateral_hits = [(m.start(), m.group(1).lower()) for m in _affirmed(_LATERAL, text)]
    lateral_hits += [(m.start(), "straight") for m in _affirmed(_STRAIGHT, text)]
    lateral = max(lateral_hits)[1] if lateral_hits else None
    if _affirmed(_STOP, text):
        longitudinal = "stop"
    elif _affirmed(_SLOW, text):
        longitudinal = "slow"
    else:
        longitudinal = None
    return Intent(lateral, longitudinal)


_LATERAL_CODE = {None: 0, "left": 1, "right": 2, "straight": 3}
_LONG_CODE = {None: 0, "slow": 1, "stop": 2}

LATERAL_FULL = 1.5
"""Metres of lateral shift toward the stated side that earn full agreement."""
STRAIGHT_SLACK = 0.3
"""Lateral wander (metres) that still counts as fully straight."""


def history_motion(history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Current speed (B,) (the action space's estimate) and curvature (B,) of the history's
    arc."""
    last = history[:, -1, :2] - history[:, -2, :2]
    first = history[:, 1, :2] - history[:, 0, :2]
    heading_change = torch.atan2(last[:, 1], last[:, 0]) - torch.atan2(first[:, 1], first[:, 0])
    arc = (history[:, 1:, :2] - history[:, :-1, :2]).norm(dim=-1).sum(-1)
    curvature = heading_change / arc.clamp_min(1e-3)
    return estimate_v0(history), curvature


def motion_alignment(
    candidates: torch.Tensor, history: torch.Tensor, intents: list[Intent], neutral: float
) -> torch.Tensor:
    """Agreement (B, C) in [0, 1] of each candidate's motion with its scene's intent.

    Lateral: the signed deviation from the history's arc extrapolated at constant
    curvature (y - kappa x^2 / 2; y is left); "right" wants the deviation to reach
    -LATERAL_FULL without going left, "left" the mirror, "straight" wants it within
    STRAIGHT_SLACK. Longitudinal: "slow" wants the path's length at most 60% of the
    constant-speed extrapolation (none at 95%), "stop" wants the final speed at most half
    the current one going to zero. Stated parts are averaged; nothing stated is neutral.
    """
    v0, kappa = history_motion(history.to(candidates.dtype))  # (B,)
    x, y = candidates[..., 0], candidates[..., 1]  # (B, C, T)
    dev = y - kappa[:, None, None] * x**2 / 2.0
    dev_min, dev_max = dev.min(-1).values, dev.max(-1).values  # (B, C)
    right = (-dev_min / LATERAL_FULL).clamp(0, 1) * (1 - (dev_max / LATERAL_FULL).clamp(0, 1))
    left = (dev_max / LATERAL_FULL).clamp(0, 1) * (1 - (-dev_min / LATERAL_FULL).clamp(0, 1))
    wander = torch.maximum(dev_max, -dev_min)
    straight = 1 - ((wander - STRAIGHT_SLACK) / LATERAL_FULL).clamp(0, 1)

    steps = candidates[..., :2].diff(dim=-2, prepend=torch.zeros_like(candidates[..., :1, :2]))
    length = steps.norm(dim=-1).sum(-1)  # (B, C)
    expected = (v0 * DT * candidates.shape[-2]).clamp_min(1e-3)[:, None]
    slow = 1 - ((length / expected - 0.6) / 0.35).clamp(0, 1)
    v_end = steps[..., -1, :].norm(dim=-1) / DT
    stop = 1 - (v_end / (0.5 * v0[:, None]).clamp_min(0.1)).clamp(0, 1)

    lat_code = torch.tensor([_LATERAL_CODE[i.lateral] for i in intents], device=x.device)
    lon_code = torch.tensor([_LONG_CODE[i.longitudinal] for i in intents], device=x.device)
    lat = torch.stack([torch.zeros_like(right), left, right, straight])  # (4, B, C)
    lon = torch.stack([torch.zeros_like(slow), slow, stop])
    lat_score = lat.gather(0, lat_code.view(1, -1, 1).expand(1, *right.shape))[0]
    lon_score = lon.gather(0, lon_code.view(1, -1, 1).expand(1, *right.shape))[0]
    count = ((lat_code > 0).to(x.dtype) + (lon_code > 0).to(x.dtype))[:, None]  # (B, 1)
    mean = (lat_score + lon_score) / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.full_like(mean, neutral))


# --------------------------------------------------------------------------- gate, reward


def gt_similarity(candidates: torch.Tensor, label: torch.Tensor, scale: float) -> torch.Tensor:
    """exp(-ADE / scale) (B, C), ADE the mean xy distance over waypoints."""
    ade = (candidates[..., :2] - label[:, None, :, :2]).norm(dim=-1).mean(-1)
    return torch.exp(-ade / scale)


def trust_gate(
    danger: torch.Tensor, label_safety: torch.Tensor, cfg: RewardConfig,
    best_sample_safety: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label weight (B,) and whether the gate fired (B,).

    Fires only when the reasoning names a danger (confidence >= danger_threshold) and the
    label's path looks unsafe: its safety < unsafe_threshold (``trust_gate_mode``
    'absolute'), or the best policy sample's safety (B,) > the label's + gate_safety_margin
    ('relative'; never without samples). The weight then falls linearly from gt_trust_max
    toward gt_trust_min with the danger confidence, so it stays within
    [gt_trust_min, gt_trust_max] and never exceeds the trusted weight.
    """
    if cfg.trust_gate_mode == "absolute":
        unsafe = label_safety < cfg.unsafe_threshold
    elif best_sample_safety is None:
        unsafe = torch.zeros_like(label_safety, dtype=torch.bool)
    else:
        unsafe = best_sample_safety > label_safety + cfg.gate_safety_margin
    fired = (danger >= cfg.danger_threshold) & unsafe
    if not cfg.use_trust_gate:
        fired = torch.zeros_like(fired)
    lowered = cfg.gt_trust_max - (cfg.gt_trust_max - cfg.gt_trust_min) * danger.clamp(0, 1)
    lowered = lowered.clamp(cfg.gt_trust_min, cfg.gt_trust_max)  # rounding must not escape
    weight = torch.where(fired, lowered, torch.full_like(lowered, cfg.gt_trust_max))
    return weight, fired


@dataclass
class RewardTerms:
    reward: torch.Tensor  # (B, C)
    safety: torch.Tensor  # (B, C)
    gt_sim: torch.Tensor  # (B, C)
    alignment: torch.Tensor  # (B, C)
    gt_weight: torch.Tensor  # (B,)
    danger: torch.Tensor  # (B,)
    gate_fired: torch.Tensor  # (B,) bool
    visible: torch.Tensor  # (B, C, T) bool


def score_candidates(
    images: torch.Tensor,
    candidates: torch.Tensor,
    label: torch.Tensor,
    history: torch.Tensor,
    K: torch.Tensor,
    T_cam_from_ego: torch.Tensor,
    reasoning: list[str],
    cfg: RewardConfig,
) -> RewardTerms:
    """Score candidates (B, C, T, 3), index 0 being ``label`` (B, T, 3), in t0 frames
    ``images`` (B, H, W, 3) uint8. Runs under no_grad: rewards are not differentiated."""
    with torch.no_grad():
        scored = path_safety(
            images, candidates.float().contiguous(), K, T_cam_from_ego,
            patch_size=cfg.safety_patch_size, texture_scale=cfg.texture_scale,
            colour_scale=cfg.colour_scale, backend=cfg.scoring_backend,
        )
        safety = scored.safety.to(candidates.dtype)
        gt_sim = gt_similarity(candidates, label, cfg.gt_sim_scale)
        intents = [parse_intent(t) for t in reasoning]
        alignment = motion_alignment(candidates, history, intents, cfg.neutral_alignment)
        danger = torch.tensor([danger_confidence(t) for t in reasoning],
                              dtype=candidates.dtype, device=candidates.device)
        best_sample = safety[:, 1:].max(dim=1).values if safety.shape[1] > 1 else None
        gt_weight, fired = trust_gate(danger, safety[:, 0], cfg, best_sample)
        reward = (cfg.safety_reward_weight * safety
                  + cfg.gt_reward_weight * gt_weight[:, None] * gt_sim
                  + cfg.reasoning_reward_weight * alignment)
    return RewardTerms(reward, safety, gt_sim, alignment, gt_weight, danger, fired,
                       scored.visible)
