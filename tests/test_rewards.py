"""Rewards and the trust gate: each rule of docs/DESIGN.md has a test here."""

import math

import numpy as np
import pytest
import torch

from srdrl.camera import default_camera
from srdrl.config import RewardConfig
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


@pytest.mark.parametrize(
    "text, lateral, longitudinal",
    [
        ("Mud patch ahead on the left at 14 m; steer right to pass it.", "right", None),
        ("Hazard on the left, go right.", "right", None),
        ("There is water on the right side of the track about 9 m out, so move left.",
         "left", None),
        ("The left side is blocked by rocks at 12 m; shift right to avoid it.", "right", None),
        ("I see mud 10 m ahead, right of centre; nudge to the left.", "left", None),
        ("Detour right: a pile of stones sits on the left of the track 20 m ahead.",
         "right", None),
        ("Rocks covers the right half of the track in 15 m. Keep left and go around it.",
         "left", None),
        ("Clear dirt track ahead; keep straight.", "straight", None),
        ("Nothing on the path; maintain course along the track.", "straight", None),
        ("Water on the left shoulder does not block the track; stay on course.",
         "straight", None),
        ("Rocks off to the left of the track, clear of our path; keep straight.",
         "straight", None),
        ("Water across the whole track at 12 m; slow down and stop before it.", None, "stop"),
        ("The track is blocked by mud 11 m ahead. Brake and come to a stop.", None, "stop"),
        ("Mud spans the full width ahead at 9 m, so slow down to a halt.", None, "stop"),
        ("Bumpy section ahead, slow down.", None, "slow"),
        ("Slow down and steer right around the puddle.", "right", "slow"),
        ("Don't go left, move right instead.", "right", None),
        ("No need to stop here; keep straight.", "straight", None),
        ("Mud on the left.", None, None),  # a location, not an instruction
        ("The sky is blue and the track is dry.", None, None),
        ("", None, None),
    ],
)
def test_parse_intent(text, lateral, longitudinal):
    assert parse_intent(text) == Intent(lateral, longitudinal)


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
