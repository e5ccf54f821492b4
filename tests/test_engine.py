"""srdrl.engine.train_step: how often each part of the policy runs in one step.

The VLM encodes the prefix once per step at every ZeRO stage: sampling happens inside the
forward pass from the step's own (detached) prefix, at ZeRO-3 too (ZeRO-3's hooks gather
the expert's parameters as the Euler loop uses them). The expert runs once per Euler step
while sampling and once for the supervised and AWR terms together.
"""

import sys
from pathlib import Path

import pytest
import torch

from srdrl.config import ObjectiveConfig, RewardConfig, TrainConfig
from srdrl.engine import SRDRLModule, initialize_engine, train_step
from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer
from srdrl.policy.noise import SceneNoise

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_policy import REASONING, make_batch  # noqa: E402

FLOW_STEPS = 3


@pytest.fixture(scope="module")
def group():
    if not torch.distributed.is_initialized():
        from srdrl.engine import init_distributed

        init_distributed()


def count_calls(module: torch.nn.Module, counts: dict, key: str) -> None:
    def hook(*_):
        counts[key] += 1
    module.register_forward_hook(hook)


def tiny_engine(stage: int, objective: dict, accumulation: int = 1, **module_options):
    """A DeepSpeed engine over a fresh tiny policy (seed 0), 2 scenes per micro-step,
    ``accumulation`` micro-steps per optimiser step, and the policy."""
    torch.manual_seed(0)
    config = PolicyConfig.tiny()
    policy = VLAPolicy(config, build_tokenizer(config, REASONING))
    objective = ObjectiveConfig(**{"num_trajectory_samples": 2, "flow_steps": FLOW_STEPS,
                                   "use_cuda_graph": False, **objective})
    module = SRDRLModule(policy, objective, RewardConfig(scoring_backend="kornia"),
                         zero_stage=stage, **module_options)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accumulation,
          "train_batch_size": 2 * accumulation, "zero_optimization": {"stage": stage},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
          "steps_per_print": 10**9}
    return initialize_engine(module, ds)[0], policy


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("rl_loss_weight", [0.5, 0.0])
def test_one_prefix_encode_per_step(group, stage, rl_loss_weight):
    engine, policy = tiny_engine(stage, {"rl_loss_weight": rl_loss_weight})
    counts = {"vlm": 0, "expert": 0}
    count_calls(policy.vlm.model, counts, "vlm")  # what encode_prefix runs
    count_calls(policy.expert, counts, "expert")
    batch = make_batch(2, height=96, width=128)
    for step in range(2):
        train_step(engine, batch, SceneNoise([2 * step, 2 * step + 1]))
    sampled = rl_loss_weight > 0
    assert counts == {"vlm": 2, "expert": 2 * (1 + FLOW_STEPS * sampled)}


def _zero3_losses_and_fetches(monkeypatch, rollout="dataset", **gather):
    """Two ZeRO-3 training steps of a fresh tiny policy with SRDRLModule's ``gather``
    options: their losses, the ZeRO-3 fetches they made, and the policy."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import (
        PartitionedParameterCoordinator,
    )

    fetches = {"n": 0}
    fetch = PartitionedParameterCoordinator.fetch_sub_module

    def counted(self, module, forward):
        fetches["n"] += 1
        return fetch(self, module, forward)

    monkeypatch.setattr(PartitionedParameterCoordinator, "fetch_sub_module", counted)
    engine, policy = tiny_engine(3, {"rollout_reasoning": rollout}, **gather)
    batch = make_batch(2, height=96, width=128)
    fetches["n"] = 0  # the steps' fetches only
    losses = [train_step(engine, batch, SceneNoise([2 * s, 2 * s + 1]))[0].item()
              for s in range(2)]
    return losses, fetches["n"], policy


@pytest.mark.slow
def test_zero3_gathers_the_expert_whole_with_the_same_losses(group, monkeypatch):
    """zero3_gather_expert_whole: one ZeRO-3 fetch per expert call instead of one per
    submodule, and the same losses as gathering submodule by submodule."""
    runs = {}
    for whole in (False, True):
        runs[whole] = _zero3_losses_and_fetches(monkeypatch, zero3_gather_expert_whole=whole)
        hooked = bool(runs[whole][2].expert.layers[0]._forward_pre_hooks)
        assert hooked != whole  # whole: the expert's submodules carry no hooks of their own
    (per_module, n_per_module, policy), (whole, n_whole, _) = runs[False], runs[True]
    assert whole == per_module
    expert_submodules = sum(1 for _ in policy.expert.modules()) - 1
    calls = 2 * (FLOW_STEPS + 1)  # expert calls in the two steps' forward passes
    assert n_per_module - n_whole >= calls * expert_submodules


@pytest.mark.slow
@pytest.mark.parametrize("rollout", ["dataset", "generated"])
def test_zero3_gathers_vlm_layers_whole_with_the_same_losses(group, monkeypatch, rollout):
    """zero3_gather_vlm_layers_whole: each VLM decoder layer and vision block is fetched as
    one unit (its submodules carry no ZeRO-3 hooks), fewer fetches, the same losses; also
    with rollouts that generate their reasoning (the VLM's layers run again, no grad)."""
    runs = {}
    for whole in (False, True):
        runs[whole] = _zero3_losses_and_fetches(monkeypatch, rollout,
                                                zero3_gather_vlm_layers_whole=whole)
        model = runs[whole][2].vlm.model
        for layer in (model.language_model.layers[0], model.visual.blocks[0]):
            inner = next(m for m in layer.modules() if m is not layer and
                         any(True for _ in m.parameters(recurse=False)))
            assert bool(inner._forward_pre_hooks) != whole
    (per_module, n_per_module, _), (whole, n_whole, _) = runs[False], runs[True]
    assert whole == per_module
    layers = [*model.language_model.layers, *model.visual.blocks]
    inner_modules = sum(sum(1 for _ in layer.modules()) - 1 for layer in layers)
    assert n_per_module - n_whole >= 2 * inner_modules  # two forward passes at least


@pytest.mark.slow
def test_zero3_sampling_replica_gives_the_same_losses(group, monkeypatch):
    """zero3_sampling_replica: the Euler loop reads the replica, refreshed before every
    step, so three ZeRO-3 steps give the losses of sampling through ZeRO-3's hooks (a
    replica left with the first step's weights would not: the optimiser changes them),
    the policy's own expert runs once per step (the supervised and AWR call) and the
    replica's FLOW_STEPS times, and ZeRO-3 fetches fewer parameters. A forward pass
    without a refresh before it is an error, not a sample from stale weights."""
    runs = {}
    for replica in (False, True):
        from deepspeed.runtime.zero.partitioned_param_coordinator import (
            PartitionedParameterCoordinator,
        )

        fetches = {"n": 0}
        fetch = PartitionedParameterCoordinator.fetch_sub_module

        def counted(self, module, forward, fetches=fetches, fetch=fetch):
            fetches["n"] += 1
            return fetch(self, module, forward)

        monkeypatch.setattr(PartitionedParameterCoordinator, "fetch_sub_module", counted)
        engine, policy = tiny_engine(3, {}, zero3_sampling_replica=replica)
        counts = {"policy": 0, "replica": 0}
        count_calls(policy.expert, counts, "policy")
        if replica:
            count_calls(engine.module.sampling_replica.expert, counts, "replica")
        batch = make_batch(2, height=96, width=128)
        fetches["n"] = 0
        losses = [train_step(engine, batch, SceneNoise([2 * s, 2 * s + 1]))[0].item()
                  for s in range(3)]
        runs[replica] = losses, fetches["n"], counts, engine
    (eager, n_eager, counts_eager, _), (copied, n_copied, counts_copied, engine) = (
        runs[False], runs[True])
    assert copied == eager
    assert counts_eager == {"policy": 3 * (1 + FLOW_STEPS), "replica": 0}
    assert counts_copied == {"policy": 3, "replica": 3 * FLOW_STEPS}
    assert n_copied < n_eager
    replica = engine.module.sampling_replica
    assert replica.refreshes == 3
    import deepspeed

    with deepspeed.zero.GatheredParameters(replica.sources()):  # the weights after step 3
        now = {k: v.clone() for k, v in engine.module.policy.expert.state_dict().items()}
    assert any(not torch.equal(now[k], v) for k, v in replica.expert.state_dict().items())
    engine.module.refresh_sampling_replica()
    assert all(torch.equal(now[k], v) for k, v in replica.expert.state_dict().items())
    engine(make_batch(2, height=96, width=128), SceneNoise([6, 7]))  # takes the fresh copy
    with pytest.raises(RuntimeError, match="not refreshed since it was last sampled"):
        engine(make_batch(2, height=96, width=128), SceneNoise([8, 9]))


@pytest.mark.slow
def test_zero3_sampling_replica_copies_once_per_optimiser_step(group):
    """Under gradient accumulation the weights change only at the optimiser step, so the
    replica is copied once per step, not once per micro-step, with the losses of sampling
    through ZeRO-3's hooks (four micro-steps, two optimiser steps: a copy not refreshed
    after the first step would sample the old weights in micro-steps 3 and 4)."""
    batch = make_batch(2, height=96, width=128)
    losses = {}
    for replica in (False, True):
        engine, _ = tiny_engine(3, {}, accumulation=2, zero3_sampling_replica=replica)
        losses[replica] = [train_step(engine, batch, SceneNoise([2 * s, 2 * s + 1]))[0].item()
                           for s in range(4)]
        assert engine.global_steps == 2
    assert losses[True] == losses[False]
    assert losses[True][2] != losses[True][0]  # the same batch after an update
    replica = engine.module.sampling_replica
    assert (replica.refreshes, replica.version) == (2, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_zero3_sampling_replica_replays_one_graph_on_gpu(group):
    """On CUDA the replica's Euler loop is captured once and replayed on every step (its
    addresses stay put across refreshes), with the losses of ZeRO-3's eager sampling."""
    from srdrl.policy.sampler import denoiser_for

    batch = make_batch(2, height=96, width=128)
    losses = {}
    for replica in (False, True):
        engine, _ = tiny_engine(3, {"use_cuda_graph": True}, zero3_sampling_replica=replica)
        losses[replica] = [train_step(engine, batch, SceneNoise([2 * s, 2 * s + 1]))[0].item()
                           for s in range(3)]
    assert denoiser_for(engine.module.sampling_replica).captures == 1
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_sampling_replica_copies_the_weights_and_refuses_partitioned_ones():
    """Known answer: after the policy's weights change, the replica's velocity is the old
    one until ``refresh`` and the policy's after it; a parameter of the wrong shape (as a
    ZeRO-3 partition is when not gathered) is an error naming it."""
    from srdrl.policy.replica import SamplingReplica

    torch.manual_seed(0)
    config = PolicyConfig.tiny()
    policy = VLAPolicy(config, build_tokenizer(config, REASONING)).eval()
    replica = SamplingReplica(policy)
    assert not any(p.requires_grad for p in replica.expert.parameters())
    prefix = policy.encode_prefix(make_batch(2, height=96, width=128))
    context = policy.expert_context(prefix, candidates=3)
    x = torch.randn(6, config.num_waypoints, 2)
    t = torch.rand(6)
    before = policy.velocity(x, t, context)
    with torch.no_grad():
        for param in policy.expert.parameters():
            param.add_(0.05 * torch.randn_like(param))
    after = policy.velocity(x, t, context)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(replica.velocity(x, t, replica.expert_context(prefix, 3)),
                               before, rtol=0, atol=0)
    replica.refresh()
    torch.testing.assert_close(replica.velocity(x, t, replica.expert_context(prefix, 3)),
                               after, rtol=0, atol=0)
    name, param = next(iter(policy.action_out_proj.named_parameters()))
    param.data = torch.empty(0)
    with pytest.raises(RuntimeError, match=f"action_out_proj.{name} is \\(0,\\) in the policy"):
        replica.refresh()


def test_vlm_layers_whole_refuses_gradient_checkpointing():
    with pytest.raises(ValueError, match="cannot be used with gradient_checkpointing"):
        TrainConfig(zero3_gather_vlm_layers_whole=True, gradient_checkpointing=True)


def test_vlm_layers_whole_default_follows_gradient_checkpointing():
    assert TrainConfig().zero3_gather_vlm_layers_whole is True
    assert TrainConfig(gradient_checkpointing=True).zero3_gather_vlm_layers_whole is False
    assert TrainConfig(zero3_gather_vlm_layers_whole=False).zero3_gather_vlm_layers_whole is False
