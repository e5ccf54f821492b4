"""Known-answer tests of the label-relative method options (docs/DESIGN.md, "The RL loss",
"Rewards and the trust gate"): trajectory noise, label-relative AWR, the supervised weight
of beaten labels, the relative trust gate. Every expected number is worked out by hand."""

import math

import pytest
import torch

from srdrl.action_space import ActionSpace
from srdrl.config import ObjectiveConfig, RewardConfig
from srdrl.exploration import RAMP_STEPS, offset_ramp, perturb_paths, trajectory_noise
from srdrl.objective import (
    advantages,
    candidate_weights,
    label_beaten,
    supervised_scene_weights,
)
from srdrl.rewards import trust_gate


def test_offset_ramp_is_a_cosine_ramp_held_after_two_seconds():
    r = offset_ramp(64)
    assert RAMP_STEPS == 20
    assert r[9].item() == pytest.approx(0.5)  # k = 10: (1 - cos(pi / 2)) / 2
    assert r[4].item() == pytest.approx((1 - math.cos(math.pi / 4)) / 2)  # k = 5
    assert r[19:].tolist() == pytest.approx([1.0] * 45)


def test_perturb_paths_scales_each_axis_and_offsets_sideways_except_sample_zero():
    x = torch.arange(1.0, 65.0)
    path = torch.stack([x, torch.full_like(x, 0.5), torch.zeros_like(x)], dim=-1)
    paths = path.expand(1, 2, 64, 3).clone()
    eps = torch.tensor([[[5.0, 5.0, 5.0], [1.0, -2.0, 1.0]]])
    out = perturb_paths(paths, eps, scale_std=0.1, offset_std=2.0)
    assert torch.equal(out[0, 0], paths[0, 0])  # the policy's own sample is kept
    assert out[0, 1, :, 0].tolist() == pytest.approx((1.1 * x).tolist())
    # y = 0.5 * (1 - 0.2) + 2 * 1 * r_k: 0.4 + 1.0 at k = 10, 0.4 + 2.0 from k = 20 on
    assert out[0, 1, 9, 1].item() == pytest.approx(1.4)
    assert out[0, 1, 30, 1].item() == pytest.approx(2.4)
    assert torch.equal(out[..., 2], paths[..., 2])


def test_trajectory_noise_candidates_are_the_rollouts_of_their_actions():
    space = ActionSpace()
    history = torch.stack([torch.arange(-15.0, 1.0) * 0.5, torch.zeros(16), torch.zeros(16)],
                          dim=-1)[None]  # 5 m/s straight
    actions = torch.zeros(1, 3, 64, 2)
    v0 = space.estimate_v0(history)[:, None].expand(1, 3)
    trajs = space.action_to_traj(space.normalize(actions), v0)
    actions = space.normalize(actions)
    gen = torch.Generator().manual_seed(0)
    new_a, new_t = trajectory_noise(actions, trajs, history, space, 0.2, 2.0, gen)
    assert torch.equal(new_a[:, 0], actions[:, 0]) and torch.equal(new_t[:, 0], trajs[:, 0])
    assert torch.allclose(space.action_to_traj(new_a, v0), new_t, atol=1e-4)
    eps = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    want = perturb_paths(trajs, torch.cat([torch.zeros(1, 3), eps])[None], 0.2, 2.0)
    # the inverse fits the perturbed path (smoothness costs a few centimetres)
    assert (new_t[0, 1:, :, :2] - want[0, 1:, :, :2]).norm(dim=-1).mean() < 0.15
    lateral = new_t[0, 1:, -1, 1]
    assert lateral.tolist() == pytest.approx((2.0 * eps[:, 2]).tolist(), abs=0.2)


def test_label_relative_advantages_weight_only_candidates_that_beat_the_label():
    reward = torch.tensor([[1.0, 1.5, 0.5, 1.0], [2.0, 1.0, 1.5, 0.0]])
    adv = advantages(reward, normalize=False, baseline="label")
    assert adv.tolist() == [[0.0, 0.5, -0.5, 0.0], [0.0, -1.0, -0.5, -2.0]]
    cfg = ObjectiveConfig(awr_baseline="label", awr_temperature=0.5)
    w = candidate_weights(adv, cfg)
    assert w[0].tolist() == pytest.approx([0.0, math.e, 0.0, 0.0])  # exp(0.5 / 0.5)
    assert w[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # the label wins: no AWR target
    mean = candidate_weights(advantages(reward, False), ObjectiveConfig(awr_temperature=0.5))
    assert mean[0, 0].item() == pytest.approx(1.0)  # the seed's: r - mean = 0 -> exp(0)
    assert label_beaten(reward).tolist() == [True, False]


def test_supervised_weight_drops_where_the_label_is_beaten_and_composes_with_the_gate():
    beaten = torch.tensor([True, False, True])
    gt_weight = torch.tensor([0.5, 0.4, 1.0])
    off = ObjectiveConfig()
    assert supervised_scene_weights(off, gt_weight, beaten) is None  # the seed's default
    on = ObjectiveConfig(lower_traj_weight_when_beaten=True, beaten_traj_weight=0.1)
    assert supervised_scene_weights(on, gt_weight, beaten).tolist() == pytest.approx(
        [0.1, 1.0, 0.1])
    both = ObjectiveConfig(lower_traj_weight_when_beaten=True, gate_supervised_loss=True)
    assert supervised_scene_weights(both, gt_weight, beaten).tolist() == pytest.approx(
        [0.05, 0.4, 0.1])
    assert supervised_scene_weights(on, None, None) is None  # no candidates: no change


def test_relative_gate_fires_on_danger_and_a_safer_sample_without_a_threshold():
    danger = torch.tensor([1.0, 1.0, 0.0, 2 / 3])
    label = torch.tensor([0.5, 0.9, 0.2, 0.6])
    best = torch.tensor([0.7, 0.95, 0.9, 0.65])
    cfg = RewardConfig(trust_gate_mode="relative", gate_safety_margin=0.1)
    weight, fired = trust_gate(danger, label, cfg, best)
    # 0.7 > 0.6: fires; 0.95 < 1.0: no; no danger: no; 0.65 < 0.7: no
    assert fired.tolist() == [True, False, False, False]
    assert weight.tolist() == pytest.approx([0.1, 1.0, 1.0, 1.0])
    _, alone = trust_gate(danger, label, cfg)  # the label scored alone: never
    assert not alone.any()
    _, absolute = trust_gate(danger, label, RewardConfig(), best)  # seed's: safety < 0.3
    assert absolute.tolist() == [False, False, False, False]
    _, low = trust_gate(danger, torch.tensor([0.2, 0.2, 0.2, 0.2]), RewardConfig(), best)
    assert low.tolist() == [True, True, False, True]


def test_method_options_are_validated():
    with pytest.raises(ValueError, match="candidate_noise"):
        ObjectiveConfig(candidate_noise="gaussian")
    with pytest.raises(ValueError, match="awr_baseline"):
        ObjectiveConfig(awr_baseline="best")
    with pytest.raises(ValueError, match="beaten_traj_weight"):
        ObjectiveConfig(beaten_traj_weight=1.5)
    with pytest.raises(ValueError, match="trust_gate_mode"):
        RewardConfig(trust_gate_mode="oracle")


# --------------------------------------------------------------------------- in the loss

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from srdrl.data.dataset import JsonlDataset, collate
    from srdrl.data.synthetic import SyntheticDataConfig, make_dataset
    from srdrl.objective import ConsistencyHeads
    from srdrl.policy.config import PolicyConfig
    from srdrl.policy.model import VLAPolicy

    root = tmp_path_factory.mktemp("method_data")
    make_dataset(SyntheticDataConfig(output_dir=str(root), num_scenes=5, width=128, height=96,
                                     label_noise=0.5, seed=2), progress=False)
    ds = JsonlDataset(root / "train.jsonl")
    torch.manual_seed(0)
    policy = VLAPolicy(PolicyConfig.tiny())
    return policy, ConsistencyHeads.for_policy(policy), collate([ds[i] for i in range(3)])


def _loss(setup, cfg, scorer):
    from srdrl.objective import srdrl_loss

    policy, heads, batch = setup
    return srdrl_loss(policy, heads, batch, cfg, RewardConfig(scoring_backend="kornia"),
                      generator=torch.Generator().manual_seed(3), scorer=scorer)[1]


def _fixed_reward(label_reward: float, seen: list | None = None):
    """A scorer whose rewards are label_reward for the label and 1.0 for every sample."""
    from srdrl.rewards import score_candidates

    def scorer(*args, **kwargs):
        if seen is not None:
            seen.append(args[1].clone())
        terms = score_candidates(*args, **kwargs)
        terms.reward = torch.ones_like(terms.reward)
        terms.reward[:, 0] = label_reward
        return terms
    return scorer


def test_beaten_labels_scale_the_supervised_loss_in_the_objective(setup):
    base = dict(num_trajectory_samples=2, flow_steps=2, consistency_loss_weight=0.0)
    plain = _loss(setup, ObjectiveConfig(**base), _fixed_reward(0.0))
    lowered = _loss(setup, ObjectiveConfig(**base, lower_traj_weight_when_beaten=True,
                                           beaten_traj_weight=0.1), _fixed_reward(0.0))
    kept = _loss(setup, ObjectiveConfig(**base, lower_traj_weight_when_beaten=True),
                 _fixed_reward(2.0))  # the label wins: weight 1
    assert plain["label_beaten"] == 1.0 and kept["label_beaten"] == 0.0
    assert lowered["traj_loss"] == pytest.approx(0.1 * plain["traj_loss"], rel=1e-5)
    assert kept["traj_loss"] == pytest.approx(plain["traj_loss"], rel=1e-6)


def test_label_baseline_gives_no_awr_target_where_the_label_wins(setup):
    cfg = ObjectiveConfig(num_trajectory_samples=2, flow_steps=2, awr_baseline="label")
    won = _loss(setup, cfg, _fixed_reward(2.0))
    assert won["awr_loss"] == 0.0 and won["awr_weight_max"] == 0.0
    lost = _loss(setup, cfg, _fixed_reward(0.5))  # A = 0.5 for every sample
    assert lost["awr_weight_max"] == pytest.approx(math.exp(0.5)) and lost["awr_loss"] > 0
    assert 0.0 <= won["gate_fired_noisy"] <= won["label_noisy"]  # logged from the flags


def test_trajectory_noise_reaches_the_scored_candidates(setup):
    seen_plain, seen_noisy = [], []
    base = dict(num_trajectory_samples=3, flow_steps=2)
    _loss(setup, ObjectiveConfig(**base), _fixed_reward(0.0, seen_plain))
    _loss(setup, ObjectiveConfig(**base, candidate_noise="trajectory"),
          _fixed_reward(0.0, seen_noisy))
    plain, noisy = seen_plain[0], seen_noisy[0]  # (B, 1 + N, T, 3), label first
    assert torch.equal(plain[:, :2], noisy[:, :2])  # label and the policy's own sample
    shift = (plain[:, 2:, :, 1] - noisy[:, 2:, :, 1]).abs().amax(dim=-1)  # (B, N - 1)
    assert (shift > 0.05).all()


def test_anchors_are_scored_after_the_samples_and_can_win(setup):
    from srdrl.anchors import anchor_candidates
    from srdrl.objective import srdrl_loss
    from srdrl.rewards import score_candidates

    policy, heads, batch = setup
    space = policy.action_space
    anchors = space.normalize(torch.tensor([[0.0, 0.05], [-1.0, -0.05]])[:, None]
                              .expand(2, 64, 2)).float()
    seen = []

    def last_wins(*args, **kwargs):  # reward = candidate index: the last anchor is best
        seen.append(args[1].clone())
        terms = score_candidates(*args, **kwargs)
        terms.reward = torch.arange(terms.reward.shape[1], dtype=terms.reward.dtype
                                    ).expand_as(terms.reward).clone()
        return terms

    cfg = ObjectiveConfig(num_trajectory_samples=2, flow_steps=2, num_anchors=2)

    def run(scorer, **kw):
        return srdrl_loss(policy, heads, batch, cfg, RewardConfig(scoring_backend="kornia"),
                          generator=torch.Generator().manual_seed(3), scorer=scorer, **kw)[1]

    won = run(last_wins, anchors=anchors)
    cands = seen[0]  # (B, 1 + 2 samples + 2 anchors, T, 3), label first
    assert cands.shape[1] == 5
    _, want = anchor_candidates(anchors, batch["ego_history_xyz"], space)
    assert torch.allclose(cands[:, 3:], want)
    assert won["anchor_is_best"] == 1.0 and won["label_beaten"] == 1.0
    lost = run(_fixed_reward(0.0), anchors=anchors)  # ties: the first sample is the argmax
    assert lost["anchor_is_best"] == 0.0
    with pytest.raises(ValueError, match="num_anchors is 2 but the anchors given are None"):
        run(last_wins)
    with pytest.raises(ValueError, match="needs the RL term"):
        ObjectiveConfig(num_anchors=2, rl_loss_weight=0.0)
