"""The SRD-RL objective: AWR weights, gradient paths, and rl_loss_weight = 0."""

import math

import pytest
import torch

from srdrl.config import ObjectiveConfig, RewardConfig
from srdrl.data.dataset import JsonlDataset, collate
from srdrl.data.synthetic import SyntheticDataConfig, make_dataset
from srdrl.objective import (
    ConsistencyHeads,
    advantages,
    awr_weights,
    consistency_loss,
    info_nce,
    label_and_awr_losses,
    srdrl_loss,
    trajectory_features,
)
from srdrl.policy.config import PolicyConfig
from srdrl.policy.generation import generate_reasoning, reasoning_prefix
from srdrl.policy.model import VLAPolicy
from srdrl.policy.sampler import sample_trajectories
from srdrl.reasoning_facts import agreement
from srdrl.rewards import score_candidates


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective_data")
    make_dataset(SyntheticDataConfig(output_dir=str(root), num_scenes=5, width=128, height=96,
                                     label_noise=0.5, seed=2), progress=False)
    ds = JsonlDataset(root / "train.jsonl")
    return collate([ds[i] for i in range(3)])


@pytest.fixture()
def policy_and_heads(batch):
    torch.manual_seed(0)
    policy = VLAPolicy(PolicyConfig.tiny())
    return policy, ConsistencyHeads.for_policy(policy)


def test_advantages_and_awr_weights_match_a_direct_computation():
    reward = torch.tensor([[1.0, 2.0, 4.0, 1.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    adv = advantages(reward, normalize=False)
    assert adv[0].tolist() == pytest.approx([-1.0, 0.0, 2.0, -1.0])
    assert torch.all(adv[1] == 0)
    norm = advantages(reward, normalize=True)
    std = math.sqrt(sum((r - 2.0) ** 2 for r in [1.0, 2.0, 4.0, 1.0]) / 4)
    assert norm[0].tolist() == pytest.approx([-1 / std, 0.0, 2 / std, -1 / std])
    assert torch.all(norm[1] == 0) and torch.isfinite(norm).all()  # ties: zero, not NaN
    w = awr_weights(adv, temperature=0.5, max_weight=20.0)
    direct = [[min(math.exp(a / 0.5), 20.0) for a in row] for row in adv.tolist()]
    assert w.tolist()[0] == pytest.approx(direct[0]) and w.tolist()[1] == pytest.approx(direct[1])
    assert w[0, 2] == pytest.approx(20.0)  # exp(4) clipped
    huge = awr_weights(torch.tensor([1e6]), 1e-3, 5.0)
    assert huge.item() == pytest.approx(5.0)  # no overflow to inf


def test_info_nce_prefers_matching_rows():
    torch.manual_seed(0)
    a = torch.randn(6, 8)
    good = info_nce(a, a + 0.01 * torch.randn(6, 8), 0.1)
    bad = info_nce(a, torch.randn(6, 8), 0.1)
    assert good < bad and torch.isfinite(good)


def test_rl_weight_zero_is_the_supervised_loss_to_the_bit(batch, policy_and_heads):
    policy, heads = policy_and_heads
    cfg = ObjectiveConfig(rl_loss_weight=0.0, consistency_loss_weight=0.2, traj_loss_weight=0.7)

    def no_sampling(*a, **k):
        raise AssertionError("rl_loss_weight = 0 must not sample")

    total, metrics = srdrl_loss(policy, heads, batch, cfg, RewardConfig(),
                                generator=torch.Generator().manual_seed(5),
                                sample_candidates=no_sampling, scorer=no_sampling)

    # the supervised loss written out independently
    g = torch.Generator().manual_seed(5)
    prefix = policy.encode_prefix(batch)
    label = batch["trajectory"].float()
    actions = policy.action_space.traj_to_action(label, batch["ego_history_xyz"].float())
    traj = policy.flow_matching_loss(prefix, actions, generator=g)
    cons = consistency_loss(heads, prefix, trajectory_features(policy, actions), 0.1)
    supervised = prefix.language_loss + 0.7 * traj + 0.2 * cons
    assert total.item() == supervised.item()  # bit for bit
    assert metrics["awr_loss"] == 0.0 and "reward_mean" not in metrics


@pytest.mark.parametrize("per_scene", [1, 3])  # awr_mode best: 1 target; all: 1 + N
def test_one_expert_call_equals_the_label_and_awr_calls_apart(batch, policy_and_heads,
                                                              per_scene):
    policy, _ = policy_and_heads
    prefix = policy.encode_prefix(batch)
    label = batch["trajectory"].float()
    actions = policy.action_space.traj_to_action(label, batch["ego_history_xyz"].float())
    targets = actions[:, None] + 0.3 * torch.randn(3, per_scene, 64, 2)
    weights = torch.rand(3, per_scene) * 5
    g = torch.Generator().manual_seed(11)
    label_draws = policy.flow_draws(actions, g)
    traj, awr = label_and_awr_losses(policy, prefix, actions, label_draws, targets, weights, g)
    g = torch.Generator().manual_seed(11)  # apart, drawing in the same order
    apart_traj = policy.flow_matching_loss(prefix, actions, generator=g, reduction="none")
    apart_awr = policy.flow_matching_loss(prefix, targets, weights, generator=g)
    torch.testing.assert_close(traj, apart_traj, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(awr, apart_awr, rtol=1e-5, atol=1e-6)
    assert apart_awr > 0 and (apart_traj > 0).all()
    (traj.sum() + awr).backward()  # one graph: both reach the expert
    assert policy.expert.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_gradients_reach_the_expert_through_awr_not_through_sampling(batch, policy_and_heads):
    policy, heads = policy_and_heads
    seen = {}
    cfg = ObjectiveConfig(rl_loss_weight=1.0, traj_loss_weight=0.0, consistency_loss_weight=0.0,
                          num_trajectory_samples=3, flow_steps=2)

    def spy(batch, generator, prefix):
        seen["grad_enabled"] = torch.is_grad_enabled()
        actions, trajs = sample_trajectories(policy, batch, 3, steps=2, generator=generator,
                                             prefix=prefix)
        seen["requires_grad"] = actions.requires_grad or trajs.requires_grad
        return actions, trajs

    reward_cfg = RewardConfig(scoring_backend="kornia")
    total, metrics = srdrl_loss(policy, heads, batch, cfg, reward_cfg,
                                generator=torch.Generator().manual_seed(0),
                                sample_candidates=spy)
    total.backward()
    assert seen == {"grad_enabled": False, "requires_grad": False}
    # the language loss never touches the expert, so its gradient is the AWR term's
    expert_grad = sum(p.grad.abs().sum() for p in policy.expert.parameters()
                      if p.grad is not None)
    assert expert_grad > 0
    assert policy.action_out_proj.weight.grad.abs().sum() > 0
    for key in ("reward_mean", "reward_best", "gt_is_best", "safety", "gt_sim", "reasoning",
                "awr_weight_mean", "awr_weight_min", "awr_weight_max", "advantage_std",
                "visible_fraction", "gate_fired"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["gt_is_best"] <= 1.0
    assert metrics["awr_weight_min"] <= metrics["awr_weight_mean"] <= metrics["awr_weight_max"]


def test_vlm_receives_the_language_gradient(batch, policy_and_heads):
    policy, heads = policy_and_heads
    cfg = ObjectiveConfig(rl_loss_weight=0.0, traj_loss_weight=0.0, consistency_loss_weight=0.0)
    total, _ = srdrl_loss(policy, heads, batch, cfg, RewardConfig())
    total.backward()
    assert policy.vlm.lm_head.weight.grad.abs().sum() > 0
    vision = [p.grad for p in policy.vlm.model.visual.parameters() if p.grad is not None]
    assert vision and sum(g.abs().sum() for g in vision) > 0  # through the image tokens
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in policy.expert.parameters())


@pytest.mark.parametrize("mode", ["best", "all"])
def test_awr_modes_and_ties_give_finite_losses(batch, policy_and_heads, mode):
    policy, heads = policy_and_heads

    def tied(*args, **kwargs):  # every candidate gets the same reward
        terms = score_candidates(*args, **kwargs)
        terms.reward = torch.full_like(terms.reward, 0.7)
        return terms

    cfg = ObjectiveConfig(awr_mode=mode, normalize_advantage=True, num_trajectory_samples=2,
                          flow_steps=2)
    total, metrics = srdrl_loss(policy, heads, batch, cfg,
                                RewardConfig(scoring_backend="kornia"), scorer=tied)
    assert torch.isfinite(total)
    assert metrics["advantage_std"] == 0.0
    assert metrics["awr_weight_min"] == metrics["awr_weight_max"] == 1.0  # exp(0)


def test_gate_scales_the_supervised_loss_when_asked(batch, policy_and_heads):
    policy, heads = policy_and_heads
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return score_candidates(*args, **kwargs)

    cfg = ObjectiveConfig(rl_loss_weight=0.0, gate_supervised_loss=True)
    total, _ = srdrl_loss(policy, heads, batch, cfg, RewardConfig(scoring_backend="kornia"),
                          scorer=spy)
    assert torch.isfinite(total) and calls == [torch.Size([3, 1, 64, 3])]  # label only


def test_self_reflective_rollouts_condition_on_and_score_the_generated_text(batch):
    """rollout_reasoning='generated': the candidates come from the prefix of the policy's
    own (greedy) reasoning, the scorer reads that text, the language loss stays the
    dataset's, and the step logs the agreement between the two texts."""
    torch.manual_seed(0)
    policy = VLAPolicy(PolicyConfig.tiny(max_reasoning_tokens=6))
    heads = ConsistencyHeads.for_policy(policy)
    seen = {}

    def spy_sampler(batch, generator, prefix):
        seen["prefix"] = prefix
        return sample_trajectories(policy, batch, 2, steps=2, generator=generator,
                                   prefix=prefix)

    def spy_scorer(*args, **kwargs):
        seen["texts"] = args[6]
        return score_candidates(*args, **kwargs)

    cfg = ObjectiveConfig(rollout_reasoning="generated", num_trajectory_samples=2,
                          flow_steps=2, consistency_loss_weight=0.0)
    total, metrics = srdrl_loss(policy, heads, batch, cfg, RewardConfig(scoring_backend="kornia"),
                                generator=torch.Generator().manual_seed(0),
                                sample_candidates=spy_sampler, scorer=spy_scorer)
    assert torch.isfinite(total)
    reasoning = generate_reasoning(policy, batch)  # greedy: the same text again
    assert seen["texts"] == reasoning.texts != batch["reasoning_text"]
    expected = reasoning_prefix(policy, batch, "generated", reasoning)
    assert torch.equal(seen["prefix"].key_mask, expected.key_mask)
    assert all(torch.equal(a, b) for a, b in zip(seen["prefix"].keys, expected.keys,
                                                   strict=True))
    assert metrics["language_loss"] == pytest.approx(policy.encode_prefix(batch).language_loss
                                                     .item(), rel=1e-6)
    agree = agreement(reasoning.texts, batch["reasoning_text"])
    assert metrics["reasoning_manoeuvre_agreement"] == pytest.approx(agree["manoeuvre_agreement"])
    assert metrics["reasoning_side_agreement"] == pytest.approx(agree["side_agreement"])
    assert metrics["reasoning_stopped"] == pytest.approx(sum(reasoning.stopped) / 3)

    # the dataset's reasoning by default: the scorer reads the data's text
    srdrl_loss(policy, heads, batch, ObjectiveConfig(num_trajectory_samples=2, flow_steps=2),
               RewardConfig(scoring_backend="kornia"), scorer=spy_scorer)
    assert seen["texts"] == batch["reasoning_text"]


def test_objective_config_validation():
    with pytest.raises(ValueError, match="rollout_reasoning"):
        ObjectiveConfig(rollout_reasoning="own")
    with pytest.raises(ValueError, match="rollout_temperature"):
        ObjectiveConfig(rollout_temperature=-0.5)
    with pytest.raises(ValueError, match="awr_mode"):
        ObjectiveConfig(awr_mode="top")
    with pytest.raises(ValueError, match="rl_loss_weight"):
        ObjectiveConfig(rl_loss_weight=-1)
    with pytest.raises(ValueError, match="num_trajectory_samples"):
        ObjectiveConfig(num_trajectory_samples=0)
