"""What a reasoning text states about its scene (hazard kind, hazard side, manoeuvre), and
the scene's truth from the data's evaluation fields, so that generated reasoning can be
scored (docs/DESIGN.md, "Evaluation") and compared with the dataset's (the self-reflective
rollouts' agreement metrics).

- kind: the first hazard word in the text: mud (mud, muddy), rocks (rock-, stone-,
  boulder-), water (water, puddle-, pool-);
- manoeuvre: what ``srdrl.rewards.parse_intent`` reads: ``stop`` when it reads a stop,
  else its lateral intent (left, right, straight), else ``slow``, else none;
- side: the first ``left``/``right`` that is not part of an instruction, by the parser's
  own rule: the word is an instruction when replacing it changes what ``parse_intent``
  reads from the text up to it ("steer right; mud on the left": the hazard is left).
  Using the parser itself keeps one rule for "instruction or description".

Truth (``scene_truth``): the hazard the reasoning should name is the one in the way, else
the distractor; its side is only asked of an in-the-way hazard that does not block the
whole track: the record's ``side`` when it has one, else the side of the centreline on
which the hazard's footprint lies (centreline y = c x^2 / 2, c fitted to the ego history,
which follows it in the synthetic data). The manoeuvre is the record's ``intent``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from srdrl.rewards import parse_intent

KIND_PATTERNS = {
    "mud": r"mud\w*",
    "rocks": r"rock\w*|stone\w*|boulder\w*",
    "water": r"water\w*|puddle\w*|pool\w*",
}
_KIND = re.compile(r"\b(?:" + "|".join(f"(?P<{k}>{p})" for k, p in KIND_PATTERNS.items())
                   + r")\b", re.IGNORECASE)
_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)
MANOEUVRES = ("left", "right", "straight", "stop", "slow")


@dataclass(frozen=True)
class Facts:
    """A hazard kind, the side the hazard is on, and the manoeuvre; None when not stated."""

    kind: str | None
    side: str | None
    manoeuvre: str | None


def stated_manoeuvre(text: str) -> str | None:
    intent = parse_intent(text)
    if intent.longitudinal == "stop":
        return "stop"
    return intent.lateral or intent.longitudinal


def stated_kind(text: str) -> str | None:
    match = _KIND.search(text)
    return None if match is None else match.lastgroup


def stated_side(text: str) -> str | None:
    for match in _SIDE.finditer(text):
        upto = text[: match.end()]
        masked = text[: match.start()] + "elsewhere"
        if parse_intent(upto).lateral == parse_intent(masked).lateral:  # not an instruction
            return match.group(1).lower()
    return None


def stated_facts(text: str) -> Facts:
    return Facts(stated_kind(text), stated_side(text), stated_manoeuvre(text))


def centreline_curvature(history_xy: np.ndarray) -> float:
    """c of y = c x^2 / 2 fitted (least squares) to the ego history (16, 2+)."""
    x, y = history_xy[:, 0], history_xy[:, 1]
    basis = x**2 / 2.0
    denominator = float(basis @ basis)
    return float(basis @ y) / denominator if denominator > 1e-9 else 0.0


def hazard_side(hazard: dict, history_xy: np.ndarray) -> str:
    """``left`` or ``right``: the record's ``side``, else where the footprint lies."""
    if hazard.get("side") in ("left", "right"):
        return hazard["side"]
    polygon = np.asarray(hazard["footprint"], dtype=np.float64)
    c = centreline_curvature(np.asarray(history_xy, dtype=np.float64))
    offset = float(np.mean(polygon[:, 1] - c * polygon[:, 0] ** 2 / 2.0))
    return "left" if offset > 0 else "right"


def scene_truth(eval_fields: dict, history_xy: np.ndarray) -> Facts:
    """The facts a correct reasoning states, from the evaluation fields ``hazards`` (kind,
    in_path, blocking, footprint, optional side) and ``intent``."""
    hazards = eval_fields.get("hazards", [])
    in_path = [h for h in hazards if h.get("in_path")]
    named = in_path or hazards
    kind = named[0]["kind"] if named else None
    side = None
    if in_path and not in_path[0].get("blocking", False):
        side = hazard_side(in_path[0], history_xy)
    return Facts(kind, side, eval_fields.get("intent"))


def accuracy(stated: list[Facts], truth: list[Facts]) -> dict:
    """Share of scenes whose text states the true kind (scenes with a hazard), side
    (scenes with an in-the-way hazard to one side), manoeuvre (scenes with an intent), and
    how often a hazard-free scene's text names a hazard; None where no scene counts."""

    def rate(pairs):
        return float(np.mean(pairs)) if pairs else None

    return {
        "hazard_kind_accuracy": rate([s.kind == t.kind for s, t in zip(stated, truth, strict=True)
                                      if t.kind is not None]),
        "hazard_side_accuracy": rate([s.side == t.side for s, t in zip(stated, truth, strict=True)
                                      if t.side is not None]),
        "manoeuvre_accuracy": rate([s.manoeuvre == t.manoeuvre
                                    for s, t in zip(stated, truth, strict=True)
                                    if t.manoeuvre is not None]),
        "false_hazard_rate": rate([s.kind is not None for s, t in zip(stated, truth, strict=True)
                                   if t.kind is None]),
    }


def agreement(generated: list[str], reference: list[str]) -> dict[str, float]:
    """Share of scenes whose generated text states the reference text's manoeuvre, and its
    hazard side; stating none where the reference states none counts as agreeing, so both
    are defined for every batch."""
    gen = [stated_facts(t) for t in generated]
    ref = [stated_facts(t) for t in reference]
    pairs = list(zip(gen, ref, strict=True))
    return {"manoeuvre_agreement": float(np.mean([g.manoeuvre == r.manoeuvre for g, r in pairs])),
            "side_agreement": float(np.mean([g.side == r.side for g, r in pairs]))}
