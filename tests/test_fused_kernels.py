"""--liger_kernels (srdrl/policy/fused_kernels.py): a clear error without CUDA; on CUDA the
fused policy trains like the unfused one within bf16 rounding over 20 steps, and its
CUDA-graph sampler gives the same candidates."""

import copy

import pytest
import torch
from loss_curves import assert_trains_like, train_losses

from srdrl.config import ObjectiveConfig
from srdrl.data.dataset import JsonlDataset, collate
from srdrl.policy.config import PolicyConfig
from srdrl.policy.fused_kernels import FusedKernelsError, apply_liger_kernels, check_liger_device
from srdrl.policy.model import VLAPolicy
from srdrl.policy.sampler import sample_trajectories

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger needs CUDA")


def test_without_cuda_the_flag_is_a_one_line_error():
    with pytest.raises(FusedKernelsError, match="needs a CUDA device \\(this run is on cpu\\)"):
        check_liger_device(torch.device("cpu"))
    with pytest.raises(FusedKernelsError, match="needs a CUDA device"):
        apply_liger_kernels(VLAPolicy(PolicyConfig.tiny()))  # built on the CPU


@pytest.fixture()
def twins(monkeypatch):
    """An unfused and a fused copy of one bf16 tiny policy on the GPU; transformers'
    rotary functions, which Liger replaces module-wide, are restored afterwards."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    for name in ("apply_rotary_pos_emb", "apply_rotary_pos_emb_vision"):
        monkeypatch.setattr(modeling_qwen3_vl, name, getattr(modeling_qwen3_vl, name))
    torch.manual_seed(0)
    plain = VLAPolicy(PolicyConfig.tiny()).cuda().to(torch.bfloat16)
    fused = copy.deepcopy(plain)
    counts = apply_liger_kernels(fused)
    layers = len(plain.vlm.model.language_model.layers)
    assert counts["vlm_text_layers"] == layers and counts["swiglu"] > layers
    assert counts["expert_rms_norm"] > 0
    return plain, fused


@pytest.mark.gpu
@needs_cuda
def test_fused_policy_trains_like_the_unfused_one_for_20_steps(data, twins):
    plain, fused = twins
    cfg = ObjectiveConfig(rl_loss_weight=0.0)  # no argmax over candidates to flip on rounding
    assert_trains_like(train_losses(fused, data, 20, cfg), train_losses(plain, data, 20, cfg))


@pytest.mark.gpu
@needs_cuda
def test_fused_expert_samples_the_same_candidates_from_a_cuda_graph(data, twins):
    plain, fused = twins
    ds = JsonlDataset(data)
    batch = collate([ds[i] for i in range(3)])
    out = {}
    for name, policy in (("plain", plain), ("fused", fused)):
        policy.eval()
        noise = torch.Generator().manual_seed(3)
        _, out[name] = sample_trajectories(policy, batch, 4, generator=noise, use_cuda_graph=True)
    scale = out["plain"].abs().amax().item()
    assert (out["fused"] - out["plain"]).abs().amax().item() < 0.02 * scale


def test_an_unknown_kernel_name_is_a_one_line_error():
    with pytest.raises(FusedKernelsError, match="unknown Liger kernels \\['geglu'\\]"):
        apply_liger_kernels(VLAPolicy(PolicyConfig.tiny()), ("swiglu", "geglu"))
