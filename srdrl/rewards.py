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

Intent rule (``parse_intent``): the reasoning is read for instructions, not descriptions.
The lateral intent is the side named by the *first* steering instruction; only when there
is none does a straight instruction give "straight", so a later "then continue straight"
(the return to the track) never overrides a side. A steering instruction is a steering verb
(``_STEER_VERBS``, bare or -ing form) followed by filler words (``_STEER_FILLERS``: over,
slightly, to, the, around, ...) and then left or right; a straight instruction is a verb of
``_STRAIGHT_VERBS``, fillers (on, going, along, the, ...) and then straight, centre,
middle, course, heading, line, lane, track, path, road or trail. An instruction does not
count when it is negated (not, never, no, cannot, without, instead, rather, or a word
ending in n't, in the same clause with at most two words between it and the verb; avoid
directly before the verb) or when it describes something else (the verb's subject, the word
before it or before one auxiliary such as is / will, is a hazard, the track, it / they /
this or a relative pronoun that / which / who). Clauses end at punctuation and at and / but
/ so / then. Hence a side without an instruction verb in front is a location ("mud at the
edge on the left"); pass and edge are not steering verbs ("rocks pass on the left"); "the
water that is heading left" describes the water. Longitudinal: stop, stopping, halt,
standstill give "stop", else slow-, brak-, decelerat-, reduc- with speed in the next two
words, ease off give "slow", each counting only when not negated.
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
#
# The intent rule is stated in the module docstring and in docs/DESIGN.md; the word lists
# below are its vocabulary. Text is read as lower-case words; punctuation and the
# conjunctions in _CLAUSE_WORDS end a clause.

_STEER_VERBS = {  # bare form: -ing form
    "steer": "steering", "move": "moving", "keep": "keeping", "shift": "shifting",
    "nudge": "nudging", "swerve": "swerving", "veer": "veering", "go": "going",
    "turn": "turning", "stay": "staying", "detour": "detouring", "bear": "bearing",
    "head": "heading", "drive": "driving", "pull": "pulling", "hug": "hugging",
    "take": "taking", "aim": "aiming", "hold": "holding", "get": "getting", "cut": "cutting",
    "swing": "swinging", "stick": "sticking", "ease": "easing", "favour": "favouring",
    "favor": "favoring",
}
_STEER_FILLERS = {
    "over", "slightly", "a", "bit", "little", "gently", "well", "around", "to", "the", "on",
    "onto", "into", "toward", "towards", "further", "farther", "more", "far", "hard",
    "sharply", "just", "for", "our", "your", "my", "it", "off", "out", "across",
}
_SIDES = {"left": "left", "leftward": "left", "leftwards": "left",
          "right": "right", "rightward": "right", "rightwards": "right"}
_STRAIGHT_VERBS = {
    "keep": "keeping", "go": "going", "continue": "continuing", "drive": "driving",
    "stay": "staying", "head": "heading", "proceed": "proceeding", "carry": "carrying",
    "hold": "holding", "maintain": "maintaining", "follow": "following",
    "stick": "sticking", "remain": "remaining",
}
_STRAIGHT_FILLERS = {
    "on", "going", "driving", "moving", "dead", "in", "to", "the", "along", "our", "my",
    "your", "this", "same", "current", "of",
}
_STRAIGHT_TARGETS = {
    "straight", "centre", "center", "middle", "course", "heading", "line", "lane", "track",
    "path", "road", "trail",
}
# A verb whose subject is one of these describes what that thing does or where it lies.
_THING_SUBJECTS = {
    "mud", "rock", "rocks", "stone", "stones", "water", "puddle", "puddles", "pool",
    "hazard", "hazards", "obstacle", "obstacles", "track", "road", "path", "trail", "ground",
    "patch", "field", "band", "pile", "terrain", "edge", "shoulder", "side", "it", "they",
    "this", "that", "which", "who",
}
_AUXILIARIES = {"is", "are", "was", "were", "will", "would", "can", "could", "may", "might",
                "should", "must", "also"}
_NEGATIONS = {"not", "never", "no", "without", "instead", "rather", "cannot"}
_CLAUSE_WORDS = {"and", "but", "so", "then"}
_STOP_WORDS = {"stop", "stopping", "halt", "standstill"}
_SLOW_STEMS = ("slow", "brak", "decelerat")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[.,;:!?()\[\]]")


def _words(text: str) -> list[str]:
    """Lower-case words and numbers, and punctuation marks that end a clause (one token
    each); other characters (hyphens, quotes) only separate words."""
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


def _is_word(token: str) -> bool:
    return token[0].isalnum()


def _negated(words: list[str], i: int) -> bool:
    """A negation in the same clause with at most two words between it and word ``i``
    (``avoid`` only directly before it)."""
    for back in range(1, 4):
        j = i - back
        if j < 0 or not _is_word(words[j]) or words[j] in _CLAUSE_WORDS:
            return False
        w = words[j]
        if w in _NEGATIONS or w.endswith("n't") or (back == 1 and w in ("avoid", "avoiding")):
            return True
    return False


def _described(words: list[str], i: int) -> bool:
    """The verb at ``i`` has a thing (a hazard, the track) or a relative pronoun as its
    subject: the word before it, or the one before an auxiliary."""
    j = i - 1
    if j >= 0 and words[j] in _AUXILIARIES:
        j -= 1
    return j >= 0 and words[j] in _THING_SUBJECTS


def _counts(words: list[str], i: int) -> bool:
    return not _negated(words, i) and not _described(words, i)


def _phrase_end(words, i, verbs, fillers, ends) -> str | None:
    """The end word when words[i] is a verb of ``verbs`` (bare or -ing), then fillers, then a
    word of ``ends``; else None."""
    if words[i] not in verbs and words[i] not in verbs.values():
        return None
    j = i + 1
    while j < len(words) and words[j] in fillers:
        j += 1
    return words[j] if j < len(words) and words[j] in ends else None


def _first(words: list[str], match) -> str | None:
    for i in range(len(words)):
        found = match(words, i)
        if found is not None and _counts(words, i):
            return found
    return None


def _steering_side(words, i):
    end = _phrase_end(words, i, _STEER_VERBS, _STEER_FILLERS, _SIDES)
    return None if end is None else _SIDES[end]


def _straight(words, i):
    end = _phrase_end(words, i, _STRAIGHT_VERBS, _STRAIGHT_FILLERS, _STRAIGHT_TARGETS)
    return None if end is None else "straight"


def _longitudinal(words: list[str]) -> str | None:
    stop = slow = False
    for i, w in enumerate(words):
        if w in _STOP_WORDS:
            stop |= not _negated(words, i)
        elif w.startswith(_SLOW_STEMS) or (
            w.startswith("reduc") and "speed" in words[i + 1: i + 3]) or (
                w == "ease" and words[i + 1: i + 2] == ["off"]):
            slow |= not _negated(words, i)
    return "stop" if stop else "slow" if slow else None


@dataclass(frozen=True)
class Intent:
    lateral: str | None  # "left" | "right" | "straight" | None
    longitudinal: str | None  # "slow" | "stop" | None

    @property
    def stated(self) -> bool:
        return self.lateral is not None or self.longitudinal is not None


@functools.lru_cache(maxsize=4096)
def parse_intent(text: str) -> Intent:
    """The manoeuvre the reasoning asks for, by the intent rule (module docstring)."""
    words = _words(text)
    lateral = _first(words, _steering_side) or _first(words, _straight)
    return Intent(lateral, _longitudinal(words))


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

    Lateral, from dev = y - kappa x^2 / 2, the signed deviation (y is left) from the
    history's arc extrapolated at constant curvature kappa: "right" is
    clamp(-min dev / S) * (1 - clamp(max dev / S)) with S = LATERAL_FULL, i.e. the largest
    deviation toward the stated side, full at S, discounted only by how far the path goes
    to the other side; a swerve that returns to the track loses nothing. "left" is the
    mirror; "straight" is full while |dev| stays within STRAIGHT_SLACK and falls to zero
    S further. Longitudinal: "slow" is full when the path's length is at most 60% of the
    constant-speed extrapolation and zero from 95%; "stop" is full at standstill on the
    last step and zero from half the current speed. Stated parts are averaged; nothing
    stated is ``neutral``.
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
