"""What a reasoning text states and what a scene holds (srdrl/reasoning_facts.py): known
answers for the stated facts, a scene's truth, accuracy and agreement."""

import numpy as np
import pytest

from srdrl.reasoning_facts import Facts, accuracy, agreement, scene_truth, stated_facts

# phrases whose reading does not depend on the finer points of the intent parser
STATED = [
    ("Mud ahead on the left at 14 m; steer right to pass it.", "mud", "left", "right"),
    ("There is a puddle on the right side of the track about 20 m out, so move left.",
     "water", "right", "left"),
    ("I see a band of rocks 9 m ahead, left of centre; nudge to the right.", "rocks", "left",
     "right"),
    ("A pile of stones across the whole track at 12 m; slow down and stop before it.", "rocks",
     None, "stop"),
    ("Clear dirt track ahead; keep straight.", None, None, "straight"),
    ("Rough rocky ground beyond the right edge of the track, clear of our path; keep straight.",
     "rocks", "right", "straight"),
    ("Slow down here.", None, None, "slow"),
    ("Standing water everywhere.", "water", None, None),
]


@pytest.mark.parametrize("text,kind,side,manoeuvre", STATED, ids=[t[:24] for t, *_ in STATED])
def test_stated_facts_known_answers(text, kind, side, manoeuvre):
    assert stated_facts(text) == Facts(kind, side, manoeuvre)


def _hazard(centre, kind="mud", in_path=True, blocking=False, **extra):
    theta = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    footprint = np.stack([centre[0] + 2 * np.cos(theta), centre[1] + 1.5 * np.sin(theta)], 1)
    return {"kind": kind, "in_path": in_path, "blocking": blocking,
            "footprint": footprint.tolist(), **extra}


def test_scene_truth_known_answers():
    x = np.linspace(-7.5, 0, 16)
    straight = np.stack([x, 0 * x], 1)
    curving_right = np.stack([x, -0.02 * x**2 / 2], 1)  # centreline y = -0.01 x^2
    left = {"hazards": [_hazard((20, 1.0))], "intent": "right"}
    assert scene_truth(left, straight) == Facts("mud", "left", "right")
    # at x = 20 the right-curving centreline is at y = -4: a hazard at y = -3 is on its left
    assert scene_truth({"hazards": [_hazard((20, -3.0))]}, curving_right).side == "left"
    assert scene_truth({"hazards": [_hazard((20, -3.0))]}, straight).side == "right"
    assert scene_truth({"hazards": [_hazard((20, 1.0), side="right")]}, straight).side == "right"
    blocking = {"hazards": [_hazard((15, 0.0), "rocks", blocking=True)], "intent": "stop"}
    assert scene_truth(blocking, straight) == Facts("rocks", None, "stop")
    distractor = {"hazards": [_hazard((15, 8.0), "water", in_path=False)], "intent": "straight"}
    assert scene_truth(distractor, straight) == Facts("water", None, "straight")
    assert scene_truth({"hazards": [], "intent": "straight"}, straight) == Facts(
        None, None, "straight")
    both = {"hazards": [_hazard((15, 8.0), "water", in_path=False), _hazard((20, -1.0))]}
    assert scene_truth(both, straight).kind == "mud"  # the one in the way


def test_accuracy_and_agreement_known_answers():
    truth = [Facts("mud", "left", "right"), Facts("rocks", None, "stop"),
             Facts(None, None, "straight"), Facts(None, None, "straight")]
    stated = [Facts("mud", "right", "right"), Facts("water", None, "stop"),
              Facts("mud", None, "straight"), Facts(None, None, "left")]
    assert accuracy(stated, truth) == {"hazard_kind_accuracy": 0.5,
                                       "hazard_side_accuracy": 0.0,
                                       "manoeuvre_accuracy": 0.75, "false_hazard_rate": 0.5}
    generated = ["Mud on the left; steer right.", "Keep straight.", "Rocks on the right."]
    dataset = ["Rocks on the left side, move right.", "Stop before the mud.", "All clear."]
    # manoeuvre: right = right, straight != stop, none = none; side: left = left,
    # none = none, right != none

    assert agreement(generated, dataset) == pytest.approx(
        {"manoeuvre_agreement": 2 / 3, "side_agreement": 2 / 3})
