"""--compile_layers (srdrl/policy/compiled_layers.py): the compiled policy trains like the
eager one (CPU: the aot_eager backend traces forward and backward through Dynamo and AOT
autograd; CUDA: inductor's generated kernels in bf16 over 20 steps), keeps its parameter
names, samples the same candidates from a CUDA graph, and the flag refuses ZeRO-3."""

import copy

import pytest
import torch
from loss_curves import assert_trains_like, train_losses

from srdrl.config import ObjectiveConfig
from srdrl.data.dataset import JsonlDataset, collate
from srdrl.policy.compiled_layers import (
    CompileLayersError,
    check_compile_layers,
    compile_policy_layers,
)
from srdrl.policy.config import PolicyConfig
from srdrl.policy.model import VLAPolicy
from srdrl.policy.sampler import sample_trajectories

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor on CUDA")


def twins(backend: str, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    plain = VLAPolicy(PolicyConfig.tiny()).to(device=device, dtype=dtype)
    compiled = copy.deepcopy(plain)
    counts = compile_policy_layers(compiled, backend)
    layers = len(plain.vlm.model.language_model.layers)
    assert counts == {"expert_layers": len(plain.expert.layers), "vlm_mlps": layers,
                      "vlm_rms_norms": 2 * layers}
    return plain, compiled


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_traced_layers_train_like_the_eager_ones_and_keep_their_names(data, lora):
    from torch._dynamo.utils import counters

    from srdrl.policy.lora import LoraSettings, apply_lora

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    plain = VLAPolicy(PolicyConfig.tiny())
    if lora:  # peft's adapters inside the compiled modules (no dropout: equal masks)
        apply_lora(plain, LoraSettings(use_peft=True, lora_dropout=0.0))
    compiled = copy.deepcopy(plain)
    compile_policy_layers(compiled, "aot_eager")
    assert list(compiled.state_dict()) == list(plain.state_dict())
    # with the AWR term, and generated reasoning in the rollout (run eagerly inside)
    cfg = ObjectiveConfig(num_trajectory_samples=3,
                          rollout_reasoning="dataset" if lora else "generated")
    plain_l = train_losses(plain, data, 3, cfg)
    compiled_l = train_losses(compiled, data, 3, cfg)
    assert plain_l[0] != plain_l[1]
    torch.testing.assert_close(torch.tensor(compiled_l), torch.tensor(plain_l),
                               rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    # the compiled code ran: a few graphs (grad mode, lengths), every frame compiled, none
    # left to eager by Dynamo's recompile limit
    assert 3 <= counters["stats"]["unique_graphs"] <= 12, dict(counters["stats"])
    assert counters["frames"]["ok"] == counters["frames"]["total"], dict(counters["frames"])
    assert not any("recompile" in k for k in counters["unimplemented"]), \
        dict(counters["unimplemented"])


def test_zero3_liger_and_unknown_backends_are_one_line_errors():
    with pytest.raises(CompileLayersError, match="ZeRO stages 0-2"):
        check_compile_layers(3)
    with pytest.raises(CompileLayersError, match="choose one"):
        check_compile_layers(2, liger_kernels=True)
    check_compile_layers(2)
    with pytest.raises(CompileLayersError, match="unknown compile backend 'tvm'"):
        compile_policy_layers(VLAPolicy(PolicyConfig.tiny()), "tvm")


@pytest.mark.gpu
@needs_cuda
def test_inductor_layers_train_like_the_eager_ones_for_20_steps_on_gpu(data):
    torch._dynamo.reset()
    plain, compiled = twins("inductor", "cuda", torch.bfloat16)
    cfg = ObjectiveConfig(rl_loss_weight=0.0)  # no argmax over candidates to flip on rounding
    assert_trains_like(train_losses(compiled, data, 20, cfg), train_losses(plain, data, 20, cfg))


@pytest.mark.gpu
@needs_cuda
def test_inductor_expert_samples_the_same_candidates_from_a_cuda_graph(data):
    torch._dynamo.reset()
    plain, compiled = twins("inductor", "cuda", torch.bfloat16)
    batch = collate([JsonlDataset(data)[i] for i in range(3)])
    out = {}
    for name, policy in (("plain", plain), ("compiled", compiled)):
        policy.eval()
        _, out[name] = sample_trajectories(policy, batch, 4, use_cuda_graph=True,
                                           generator=torch.Generator().manual_seed(3))
    scale = out["plain"].abs().amax().item()
    assert (out["compiled"] - out["plain"]).abs().amax().item() < 0.02 * scale
