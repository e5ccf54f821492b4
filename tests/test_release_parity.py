"""Parity with the Alpamayo-R1 release: srdrl's expert against transformers' Qwen3-VL text
decoder (the class the release instantiates) fed the VLM's cache; and, where the release's
source is on disk (``SRDRL_ALPAMAYO_SRC`` = its ``src`` folder; it is never downloaded),
its own ``PerWaypointActionInProjV2`` and ``FlowMatching``."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, Qwen3VLTextModel

from srdrl.data.dataset import JsonlDataset, collate
from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer
from srdrl.policy.model import _CACHE_KWARG, _ROPE_INDEX_TAKES_TYPES, flow_times

sys.path.insert(0, str(Path(__file__).resolve().parent))
from release_source import needs_release, release_module  # noqa: E402


@pytest.fixture(scope="module")
def batch(data):
    """Two generated scenes (the shared training set of conftest.py)."""
    ds = JsonlDataset(data)
    return collate([ds[i] for i in range(2)])


def test_expert_matches_transformers_text_decoder_with_vlm_cache(batch):
    """The release's expert is transformers' Qwen3-VL text decoder fed the VLM's cache, with
    action token k at text position P + k and no causal mask. srdrl's expert (prefix keys
    shifted by -P, action tokens rotated by k) must give the same hidden states."""
    torch.manual_seed(0)
    config = PolicyConfig.tiny(expert_num_attention_heads=4)
    policy = VLAPolicy(config, build_tokenizer(config, list(batch["reasoning_text"]))).eval()
    inputs = policy.build_inputs(batch)
    x_t, t = torch.randn(2, 64, 2), torch.rand(2)
    with torch.no_grad():
        prefix = policy.encode_prefix(batch, inputs)
        ours = policy.expert(policy.action_in_proj(x_t, t), policy.expert_context(prefix))

        # the release's way: its text decoder class, our weights, the VLM's own cache
        text = copy.deepcopy(policy.vlm.config.text_config)
        text.hidden_size, text.intermediate_size = (config.expert_hidden_size,
                                                    config.expert_intermediate_size)
        expert = Qwen3VLTextModel(text).eval()
        del expert.embed_tokens
        expert.load_state_dict(policy.expert.state_dict(), strict=True)
        model = policy.vlm.model
        rope = dict(image_grid_thw=inputs.image_grid_thw, attention_mask=inputs.attention_mask)
        if _ROPE_INDEX_TAKES_TYPES:
            rope["mm_token_type_ids"] = inputs.mm_token_type_ids
        position_ids, _ = model.get_rope_index(inputs.input_ids, **rope)  # (3, B, L)
        cache = DynamicCache()
        model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
              position_ids=position_ids, pixel_values=inputs.pixel_values,
              image_grid_thw=inputs.image_grid_thw, mm_token_type_ids=inputs.mm_token_type_ids,
              use_cache=True, **{_CACHE_KWARG: cache})
        start = position_ids.masked_fill(~inputs.attention_mask.bool(), 0).amax(dim=(0, 2)) + 1
        positions = (start[:, None] + torch.arange(64)).unsqueeze(0).expand(3, -1, -1)
        length = inputs.input_ids.shape[1]
        mask = torch.zeros(2, 1, 64, length + 64)
        mask[..., :length] = torch.where(inputs.attention_mask.bool(), 0.0, float("-inf"))[
            :, None, None]
        theirs = expert(inputs_embeds=policy.action_in_proj(x_t, t), position_ids=positions,
                        attention_mask=mask, use_cache=True, **{_CACHE_KWARG: cache})
    torch.testing.assert_close(ours, theirs.last_hidden_state, atol=2e-5, rtol=1e-4)


def test_beta_flow_times_have_the_release_distribution():
    """t = 0.999 (1 - s), s ~ Beta(1.5, 1): the inverse-CDF draw against torch's sampler."""
    n = 200_000
    ours = flow_times(torch.rand(n, generator=torch.Generator().manual_seed(0)), "beta")
    torch.manual_seed(1)
    beta = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0)).sample((n,))
    theirs = 0.999 - beta * 0.999
    q = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(ours.quantile(q), theirs.quantile(q), atol=6e-3)
    assert ours.max() <= 0.999 and ours.min() >= 0  # never exactly data
    assert torch.equal(flow_times(ours, "uniform"), ours)


@needs_release
def test_action_in_proj_matches_the_release_module():
    release = release_module("alpamayo_r1.models.action_in_proj")
    theirs = release.PerWaypointActionInProjV2(in_dims=[64, 2], out_dim=48, num_enc_layers=3,
                                               hidden_size=32, max_freq=100.0,
                                               num_fourier_feats=20)
    config = PolicyConfig.tiny(expert_hidden_size=48, action_in_num_layers=3,
                               action_in_hidden_size=32, fourier_frequencies=10,
                               fourier_min_frequency=1.0, fourier_max_frequency=100.0)
    from srdrl.policy.action_proj import build_action_in_proj

    ours = build_action_in_proj(config)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same names and shapes
    x, t = torch.randn(5, 64, 2) * 2, torch.rand(5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t.view(5, 1, 1)), atol=1e-5, rtol=1e-5)


@needs_release
def test_flow_times_match_the_release_flow_matching():
    release = release_module("alpamayo_r1.diffusion.flow_matching")
    fm = release.FlowMatching(x_dims=[64, 2])
    torch.manual_seed(0)
    theirs = fm.construct_training_data(torch.zeros(100_000, 64, 2))["timesteps"].flatten()
    ours = flow_times(torch.rand(100_000, generator=torch.Generator().manual_seed(3)), "beta")
    q = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(ours.quantile(q), theirs.quantile(q), atol=8e-3)
