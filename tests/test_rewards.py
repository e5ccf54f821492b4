"""Rewards and the trust gate: each rule of docs/DESIGN.md has a test here."""

import math

import numpy as np
import pytest
import torch

from srdrl.camera import default_camera
from srdrl.config import RewardConfig
from srdrl.data import scenes
from srdrl.data.render import render_frame
from srdrl.data.scenes import (
    Hazard,
    centreline_history,
    constant_speed_trajectory,
    sample_scene,
    stopping_trajectory,
    swerve_trajectory,
)
from srdrl.rewards import (
    Intent,
    danger_confidence,
    gt_similarity,
    motion_alignment,
    parse_intent,
    score_candidates,
    trust_gate,
)


@pytest.mark.parametrize(
    "text, count",
    [
        ("Clear dirt track ahead; keep straight.", 0),
        ("Mud ahead.", 1),
        ("MUD and Rocks and a puddle", 3),
        ("Muddy, rocky and watery ground", 0),  # whole words only
        ("stone, stones, rock, rocks, water, hazard", 6),
        ("Avoid the rough, uneven, slippery bump: danger, unsafe obstacle, detour", 10),
        ("mud-covered track", 1),  # a hyphen is a word boundary
    ],
)
def test_danger_confidence(text, count):
    assert danger_confidence(text) == pytest.approx(min(count / 3, 1))


# Known answers for the intent rule (docs/DESIGN.md, "Rewards and the trust gate"): the
# issue's four misreadings, every synthetic template, and free text a small model may write.
INTENT_TABLE = [
    # descriptions after the instruction do not override it
    ("Steer right; there is mud at the edge on the left.", "right", None),
    ("Move right. Rocks pass on the left.", "right", None),
    ("Steer right to avoid the water that is heading left.", "right", None),
    ("Steer right to pass the mud, then continue straight.", "right", None),
    # the synthetic templates (srdrl/data/scenes.py)
    ("I see mud on the left side of the track ahead; steer right to pass it.", "right", None),
    ("Ahead: water on the right half of the track, so I will keep left.", "left", None),
    ("Looking ahead, I spot rocks over the left side of the track. Move to the right and go "
     "around it.", "right", None),
    ("There is a patch of mud on the right of the track. Shift left to avoid it, then "
     "continue straight.", "left", None),
    ("I see water across the whole track ahead; slow down and stop before it.", None, "stop"),
    ("Ahead: rocks across the full width of the track. Brake and come to a stop.", None, "stop"),
    ("Looking ahead, I spot mud blocking the whole track, so slow down to a halt.",
     None, "stop"),
    ("There is a patch of water across the full track with no way around. Stop before "
     "reaching it.", None, "stop"),
    ("I see rocks off to the left of the track, clear of our path; keep straight.",
     "straight", None),
    ("Ahead: mud beyond the right edge of the track, not in the way. Continue straight.",
     "straight", None),
    ("Looking ahead, I spot water on the left shoulder, which does not block the track; "
     "stay on course.", "straight", None),
    ("There is a patch of rocks on the right shoulder, outside the track. Keep going "
     "straight.", "straight", None),
    ("I see a clear dirt track ahead; keep straight.", "straight", None),
    ("Ahead: the track is smooth and clear. Continue straight at a steady speed.",
     "straight", None),
    ("Looking ahead, I spot nothing on the track; maintain course.", "straight", None),
    ("There is a clear dirt road ahead, nothing in the way. Go straight.", "straight", None),
    # free text
    ("Mud ahead on the left, so I will keep right.", "right", None),
    ("There is water on the right; move to the left side.", "left", None),
    ("No hazards; keep going straight.", "straight", None),
    ("Rocks block the track: slow down and stop.", None, "stop"),
    ("Don't turn left, go right.", "right", None),
    ("Stay left of the rocks.", "left", None),
    ("Don't go left, move right instead.", "right", None),
    ("Mud on the left, which means we should move right.", "right", None),
    ("Rocks that go right up to the edge; keep left.", "left", None),
    ("Water heading left; keep right.", "right", None),
    ("Keep straight for now, then move right around the mud.", "right", None),
    ("The rocks are on the right, so veer slightly to the left and then return to the track.",
     "left", None),
    ("Avoid the mud by steering right.", "right", None),
    ("Avoid turning left; the rocks are there.", None, None),
    ("I would not steer right here; the right side is muddy. Steer left.", "left", None),
    ("We do not need to swerve left; hold our line.", "straight", None),
    ("Go around it on the right.", "right", None),
    ("Head for the right side of the track.", "right", None),
    ("A puddle on the right-hand side; nudge leftwards.", "left", None),
    ("Mud ahead; I'm going to move right.", "right", None),
    ("STEER LEFT NOW!", "left", None),
    ("The track turns right; stay on course.", "straight", None),
    ("The road bends left ahead; follow the track.", "straight", None),
    ("Keep to the centre of the track.", "straight", None),
    ("Slow down and steer right around the puddle.", "right", "slow"),
    ("Without slowing down, bear left around the water.", "left", None),
    ("Pull over to the right and come to a halt.", "right", "stop"),
    ("Reduce speed and keep to the left of the rocks.", "left", "slow"),
    ("Ease off and drive straight on.", "straight", "slow"),
    ("There is no need to slow down; the track is clear, continue straight.", "straight", None),
    ("No need to stop here; keep straight.", "straight", None),
    ("Bumpy section ahead, slow down.", None, "slow"),
    ("Mud on the left.", None, None),  # a location, not an instruction
    ("The sky is blue and the track is dry.", None, None),
    ("", None, None),
]


@pytest.mark.parametrize("text, lateral, longitudinal", INTENT_TABLE)
def test_parse_intent(text, lateral, longitudinal):
    assert parse_intent(text) == Intent(lateral, longitudinal)


def test_intent_table_covers_the_templates():
    """Every synthetic template, filled in, is a row of the table above."""
    rows = {text for text, _, _ in INTENT_TABLE}
    filled = {template.format(kind=kind, hside=hside, go=go)
              for template, (kind, hside, go) in zip(
                  [*scenes._SWERVE, *scenes._STOP, *scenes._DISTRACTOR, *scenes._CLEAR],
                  [("mud", "left", "right"), ("water", "right", "left"),
                   ("rocks", "left", "right"), ("mud", "right", "left"),
                   ("water", "", ""), ("rocks", "", ""), ("mud", "", ""), ("water", "", ""),
                   ("rocks", "left", ""), ("mud", "right", ""), ("water", "left", ""),
                   ("rocks", "right", ""), *[("", "", "")] * len(scenes._CLEAR)],
                  strict=True)}
    assert filled <= rows, filled - rows


def test_parse_intent_matches_every_generated_scene():
    want = {"right": Intent("right", None), "left": Intent("left", None),
            "straight": Intent("straight", None), "stop": Intent(None, "stop")}
    for i in range(600):
        scene = sample_scene(np.random.default_rng([11, i]))
        assert parse_intent(scene.reasoning) == want[scene.intent], scene.reasoning


def _motions(speed=5.0):
    """Candidates (1, 5, 64, 3): straight, swerve right, swerve left, stop, slow-ish."""
    t = torch.tensor
    return torch.stack([
        t(constant_speed_trajectory(speed, 0.0)),
        t(swerve_trajectory(speed, 0.0, -2.0, 12.0, 18.0)),
        t(swerve_trajectory(speed, 0.0, 2.0, 12.0, 18.0)),
        t(stopping_trajectory(speed, 0.0, 10.0)),
        t(constant_speed_trajectory(0.5 * speed, 0.0)),
    ])[None]


@pytest.mark.parametrize(
    "intent, best",
    [(Intent("right", None), 1), (Intent("left", None), 2), (Intent("straight", None), 0),
     (Intent(None, "stop"), 3), (Intent(None, "slow"), None)],
)
def test_motion_alignment_judges_the_candidate_against_the_words(intent, best):
    cands = _motions()
    hist = torch.tensor(centreline_history(5.0, 0.0))[None]
    score = motion_alignment(cands, hist, [intent], neutral=0.5)[0]
    assert torch.all((score >= 0) & (score <= 1))
    if best is not None:
        assert score[best] == pytest.approx(1.0, abs=0.02)
        # "straight" says nothing of speed, so braking straight ahead agrees with it too
        others = {0: [1, 2], 1: [0, 2, 3, 4], 2: [0, 1, 3, 4], 3: [0, 1, 2]}[best]
        assert torch.all(score[others] < 0.5), score
    else:  # slow: the stop and the half-speed path slow down, the others do not
        assert score[3] > 0.9 and score[4] > 0.9 and torch.all(score[:3] < 0.1)


@pytest.mark.parametrize(
    "dips, right, left, straight",
    [
        ((-0.75, 0.0), 0.5, 0.0, 0.7),  # half-way right and back: returning costs nothing
        ((-3.0, 0.0), 1.0, 0.0, 0.0),  # past LATERAL_FULL: full credit
        ((-0.75, 0.3), 0.4, 0.1, 0.7),  # crossing 0.3 m to the other side costs 0.3 / 1.5
        ((0.2, -0.2), 0.2 / 1.5 * (1 - 0.2 / 1.5), 0.2 / 1.5 * (1 - 0.2 / 1.5), 1.0),
    ],
)
def test_lateral_alignment_known_answers(dips, right, left, straight):
    """On a straight history dev = y: right = clamp(-min y / 1.5) (1 - clamp(max y / 1.5)),
    left the mirror, straight = 1 - clamp((max |y| - 0.3) / 1.5)."""
    path = constant_speed_trajectory(5.0, 0.0)
    path[20:30, 1], path[40:50, 1] = dips  # (64, 3): a step one way, later one the other
    cands = torch.tensor(path)[None, None]
    hist = torch.tensor(centreline_history(5.0, 0.0))[None]
    got = [motion_alignment(cands, hist, [Intent(side, None)], 0.5).item()
           for side in ("right", "left", "straight")]
    assert got == pytest.approx([right, left, straight], abs=1e-9)


def test_motion_alignment_neutral_and_curved_track():
    hist = torch.tensor(centreline_history(6.0, 0.003))[None]
    on_curve = torch.tensor(constant_speed_trajectory(6.0, 0.003))[None, None]
    straight = motion_alignment(on_curve, hist, [Intent("straight", None)], 0.5)
    assert straight.item() == pytest.approx(1.0, abs=1e-3)  # following the bend is straight
    none = motion_alignment(on_curve, hist, [Intent(None, None)], 0.37)
    assert none.item() == pytest.approx(0.37)


def test_gt_similarity():
    label = torch.tensor(constant_speed_trajectory(5.0, 0.0))[None]
    shifted = label.clone()
    shifted[..., 1] += 1.0
    sim = gt_similarity(torch.stack([label, shifted], dim=1), label, 2.0)
    torch.testing.assert_close(sim, torch.tensor([[1.0, math.exp(-0.5)]], dtype=sim.dtype))


def test_trust_gate_bounded_monotonic_and_needs_both_conditions():
    cfg = RewardConfig()
    danger = torch.linspace(0, 1, 101, dtype=torch.float64)
    unsafe = torch.full_like(danger, 0.1)
    safe = torch.full_like(danger, 0.9)
    w_unsafe, fired_unsafe = trust_gate(danger, unsafe, cfg)
    w_safe, fired_safe = trust_gate(danger, safe, cfg)
    assert torch.all((w_unsafe >= cfg.gt_trust_min) & (w_unsafe <= cfg.gt_trust_max))
    assert torch.all(w_unsafe[1:] <= w_unsafe[:-1])  # non-increasing in danger
    assert torch.all(w_unsafe <= w_safe)  # never above the trusted weight
    assert torch.all(fired_unsafe == (danger >= cfg.danger_threshold))
    assert not fired_safe.any() and torch.all(w_safe == cfg.gt_trust_max)
    assert w_unsafe[-1].item() == pytest.approx(cfg.gt_trust_min)
    # exactly at the thresholds: danger >= threshold fires, safety == unsafe does not
    w, f = trust_gate(torch.tensor([0.3, 0.3]), torch.tensor([0.2999, 0.3]), cfg)
    assert f.tolist() == [True, False]
    off = RewardConfig(use_trust_gate=False)
    assert torch.all(trust_gate(danger, unsafe, off)[0] == off.gt_trust_max)


def test_reward_config_validation():
    with pytest.raises(ValueError, match="gt_trust_min <= gt_trust_max"):
        RewardConfig(gt_trust_min=0.9, gt_trust_max=0.5)
    with pytest.raises(ValueError, match="scoring_backend"):
        RewardConfig(scoring_backend="opencv")
    with pytest.raises(ValueError, match="danger_threshold"):
        RewardConfig(danger_threshold=1.5)


@pytest.mark.parametrize("backend", ["kornia", "reference"])
def test_avoiding_candidate_beats_a_label_through_the_named_hazard(backend):
    """Hand-built scene: the label drives through mud that the reasoning names."""
    pytest.importorskip("cv2") if backend == "reference" else None
    rng = np.random.default_rng(0)
    scene = sample_scene(rng)
    scene.curvature, scene.track_half_width = 0.0, 4.2
    scene.hazards = [Hazard("mud", (13.0, 1.3), (3.0, 2.2), (0.3, 1.1), True)]
    speed = 4.0
    W, H = 640, 384
    K, T = default_camera(W, H)
    image = torch.from_numpy(render_frame(scene, K.numpy(), T.numpy(), W, H, rng))[None]
    label = torch.tensor(constant_speed_trajectory(speed, 0.0), dtype=torch.float32)
    avoid = torch.tensor(swerve_trajectory(speed, 0.0, -2.1, 9.8, 16.2), dtype=torch.float32)
    into_shoulder = torch.tensor(swerve_trajectory(speed, 0.0, 5.5, 6.0, 16.0),
                                 dtype=torch.float32)
    candidates = torch.stack([label, avoid, into_shoulder])[None]  # (1, 3, 64, 3)
    reasoning = ["Mud patch ahead on the left at 10 m; steer right to pass it."]
    hist = torch.tensor(centreline_history(speed, 0.0), dtype=torch.float32)[None]
    cfg = RewardConfig(scoring_backend=backend)
    terms = score_candidates(image, candidates, label[None], hist, K[None].float(),
                             T[None].float(), reasoning, cfg)
    r = terms.reward[0]
    assert terms.safety[0, 1] > terms.safety[0, 0]  # the mud looks unsafe
    assert r[1] > r[0], terms
    assert int(r.argmax()) != 0  # gt_is_best is 0
    assert terms.alignment[0].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    assert terms.gt_sim[0, 0] == pytest.approx(1.0)
    expected = (cfg.safety_reward_weight * terms.safety + cfg.gt_reward_weight
                * terms.gt_weight[:, None] * terms.gt_sim
                + cfg.reasoning_reward_weight * terms.alignment)
    torch.testing.assert_close(terms.reward, expected)


def test_every_generated_hazard_is_named_with_a_danger_word():
    for i in range(400):
        scene = sample_scene(np.random.default_rng([13, i]))
        if scene.hazards:
            assert danger_confidence(scene.reasoning) > 0, scene.reasoning
