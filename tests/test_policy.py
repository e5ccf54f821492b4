"""The VLA policy: tokenizer, VLM inputs, prefix, expert, flow matching, sampler, checkpoints.

CPU tests use the tiny config; the CUDA-graph tests are marked ``gpu`` and skipped without
CUDA.
"""

import math

import pytest
import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

from srdrl.policy import (
    Denoiser,
    PolicyConfig,
    VLAPolicy,
    build_tokenizer,
    initial_noise,
    sample_trajectories,
)
from srdrl.policy.expert import shift_rotary
from srdrl.policy.inputs import IGNORE_INDEX, ego_motion
from srdrl.policy.tokenizer import (
    IM_END,
    IMAGE_PAD,
    SPECIAL_TOKENS,
    VISION_START,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

REASONING = [
    "Mud patch ahead on the left at 14 m; steer right to pass it.",
    "Clear dirt track ahead; keep straight.",
    "The track is blocked by loose rocks 9 m ahead. Brake and come to a stop.",
    "I see a puddle 21 m ahead, right of centre; nudge to the left.",
]

def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_batch(num_scenes=3, frames=1, height=192, width=320, seed=0, reasoning=None):
    g = torch.Generator().manual_seed(seed)
    speed = 2.0 + 6.0 * torch.rand(num_scenes, generator=g)  # m/s
    yaw_rate = 0.3 * (torch.rand(num_scenes, generator=g) - 0.5)  # rad/s
    t = torch.arange(-15, 1, dtype=torch.float32) * 0.1  # (16,)
    heading = yaw_rate[:, None] * t  # (B, 16)
    step = speed[:, None] * 0.1
    # integrate backwards from the origin so the last pose is exactly (0, 0)
    dx, dy = step * heading.cos(), step * heading.sin()
    x = -(dx.flip(1).cumsum(1).flip(1) - dx)
    y = -(dy.flip(1).cumsum(1).flip(1) - dy)
    history = torch.stack([x, y, torch.zeros_like(x)], -1)  # (B, 16, 3)
    texts = reasoning or [REASONING[i % len(REASONING)] for i in range(num_scenes)]
    return {
        "images": torch.randint(0, 256, (num_scenes, frames, height, width, 3),
                                dtype=torch.uint8, generator=g),
        "trajectory": torch.randn(num_scenes, 64, 3, generator=g),
        "ego_history_xyz": history,
        "K": torch.eye(3).expand(num_scenes, 3, 3).clone(),
        "T_cam_from_ego": torch.eye(4).expand(num_scenes, 4, 4).clone(),
        "reasoning_text": texts[:num_scenes],
        "sample_id": [f"scene{i}" for i in range(num_scenes)],
    }


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    config = PolicyConfig.tiny()
    return VLAPolicy(config, build_tokenizer(config, REASONING)).eval()


@pytest.fixture(scope="module")
def batch():
    return make_batch()


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens_and_round_trip(tmp_path):
    tok = train_tokenizer(REASONING * 3, vocab_size=400)
    assert len(tok) <= 400
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == i
    text = (f"<|im_start|>user\n{VISION_START}{IMAGE_PAD}{IMAGE_PAD}<|vision_end|>"
            f"Schlamm 🚗 ahead{IM_END}")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IMAGE_PAD)) == 2  # never split
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nSchlamm 🚗 ahead"
    assert tok.pad_token_id == 0 and tok.eos_token == IM_END
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(REASONING, vocab_size=100)


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    "frames,height,width", [(1, 192, 320), (2, 97, 131)], ids=["1x320x192", "2x131x97"]
)
def test_inputs_image_tokens_match_grid(policy, frames, height, width):
    b = make_batch(num_scenes=2, frames=frames, height=height, width=width)
    inputs = policy.build_inputs(b)
    tok = policy.tokenizer
    grid = inputs.image_grid_thw  # (B * F, 3)
    assert grid.shape == (2 * frames, 3)
    assert inputs.pixel_values.shape[0] == int(grid.prod(-1).sum())
    merge = policy.config.spatial_merge_size
    per_scene = (grid.prod(-1) // merge**2).view(2, frames).sum(1)
    is_pad = inputs.input_ids == tok.convert_tokens_to_ids(IMAGE_PAD)
    assert torch.equal(is_pad.sum(1), per_scene)
    assert torch.equal(inputs.mm_token_type_ids, is_pad.int())
    assert torch.equal((inputs.input_ids == tok.convert_tokens_to_ids(VISION_START)).sum(1),
                       torch.full((2,), frames))
    length = inputs.input_ids.shape[1]
    assert length % policy.config.pad_to_multiple_of == 0
    mask = inputs.attention_mask
    assert torch.all(mask[:, :-1] >= mask[:, 1:])  # right padding
    assert torch.all(inputs.input_ids[mask == 0] == tok.pad_token_id)


def test_labels_only_on_reasoning_and_closing_token(policy, batch):
    inputs = policy.build_inputs(batch)
    tok = policy.tokenizer
    for b, text in enumerate(batch["reasoning_text"]):
        labelled = inputs.labels[b][inputs.labels[b] != IGNORE_INDEX]
        assert tok.decode(labelled) == text + IM_END
        assert torch.equal(inputs.labels[b][inputs.labels[b] != IGNORE_INDEX],
                           inputs.input_ids[b][inputs.labels[b] != IGNORE_INDEX])
        assert tok.decode(inputs.input_ids[b][inputs.reasoning_mask[b]]) == text
    prompt = tok.decode(inputs.input_ids[0][inputs.attention_mask[0].bool()])
    assert "Speed " in prompt and "yaw rate" in prompt and prompt.endswith("<|traj_future_start|>")


def test_inputs_move_field_by_field_and_keep_their_values(policy, batch):
    inputs = policy.input_builder(batch)
    moved = inputs.to("cpu")
    assert type(moved) is type(inputs)
    for name, value in vars(inputs).items():
        assert torch.equal(getattr(moved, name), value), name
    prompt = policy.input_builder.prompt(batch)
    assert torch.equal(prompt.to("cpu").pixel_values, prompt.pixel_values)


def test_ego_motion_speed_and_turn_sign():
    b = make_batch(num_scenes=4, seed=3)
    speed, yaw_rate = ego_motion(b["ego_history_xyz"])
    seg = b["ego_history_xyz"][:, 1:, :2] - b["ego_history_xyz"][:, :-1, :2]  # (B, 15, 2)
    assert torch.allclose(speed.float(), seg[:, -1].norm(dim=-1) / 0.1, rtol=0.02)
    heading = torch.atan2(seg[..., 1], seg[..., 0])
    true_rate = (heading[:, -1] - heading[:, 0]) / (14 * 0.1)  # constant-rate histories
    assert torch.allclose(yaw_rate.float(), true_rate, atol=1e-3)
    assert torch.all(torch.sign(yaw_rate) == -torch.sign(heading[:, 0]))  # left turn: positive
    still = torch.zeros(1, 16, 3)
    assert ego_motion(still)[1].item() == 0.0


# --------------------------------------------------------------------------- VLM prefix


def test_prefix_shapes_and_language_loss(policy, batch):
    inputs = policy.build_inputs(batch)
    prefix = policy.encode_prefix(batch, inputs)
    cfg = policy.config
    num_scenes, length = inputs.input_ids.shape
    assert len(prefix.keys) == len(prefix.values) == cfg.num_layers
    for k, v in zip(prefix.keys, prefix.values, strict=True):
        assert k.shape == v.shape == (num_scenes, cfg.num_key_value_heads, length, cfg.head_dim)
    assert torch.equal(prefix.key_mask, inputs.attention_mask.bool())
    assert prefix.vision_features.shape == prefix.language_features.shape == (
        num_scenes, cfg.text_hidden_size)
    loss = prefix.language_loss
    assert torch.isfinite(loss) and abs(loss.item() - math.log(cfg.vocab_size)) < 1.0
    # transformers' own logits, shifted cross-entropy per scene, then the mean over scenes
    with torch.no_grad():
        logits = policy.vlm(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
            pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw,
            mm_token_type_ids=inputs.mm_token_type_ids,
        ).logits
    per_scene = [
        torch.nn.functional.cross_entropy(logits[b, :-1].float(), inputs.labels[b, 1:],
                                          ignore_index=-100)
        for b in range(num_scenes)
    ]
    assert torch.allclose(loss, torch.stack(per_scene).mean(), atol=1e-5)
    # action tokens sit one text position after the last real prefix token
    assert torch.all(prefix.action_position <= inputs.attention_mask.sum(1))


def test_rotary_shift_equals_relative_position(policy):
    rotary = policy.vlm.model.language_model.rotary_emb
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 3, 5, policy.config.head_dim, generator=g)  # (B, H, L, D)
    pos = torch.randint(0, 50, (3, 2, 5), generator=g)  # M-RoPE (t, h, w) positions
    shift = torch.tensor([37, 12])
    cos, sin = rotary(keys, pos)
    rotated, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
    cos_s, sin_s = rotary(keys, (-shift).view(1, 2, 1).expand(3, 2, 1))
    shifted = shift_rotary(rotated, cos_s[:, 0], sin_s[:, 0])
    cos_r, sin_r = rotary(keys, pos - shift.view(1, 2, 1))
    direct, _ = apply_rotary_pos_emb(keys, keys, cos_r, sin_r)
    assert torch.allclose(shifted, direct, atol=1e-4)


def test_expert_parameter_names_match_qwen3vl_text_decoder(policy):
    text_model = policy.vlm.model.language_model
    qwen = {n for n, _ in text_model.named_parameters() if n.startswith(("layers.", "norm."))}
    ours = {n for n, _ in policy.expert.named_parameters()}
    assert ours == qwen
    cfg = policy.config
    attn = policy.expert.layers[0].self_attn
    assert attn.k_proj.out_features == cfg.num_key_value_heads * cfg.head_dim
    assert attn.q_norm.weight.shape == (cfg.head_dim,)


def _naive_attention(attn, x, keys, values, key_mask, candidates, rotary=None):
    """Reference: every row (scene b, candidate n) attends to its scene's real prefix keys
    and its own action keys, query heads sharing KV heads by repetition, one row at a time;
    with ``rotary`` (cos, sin) (T, D) action token k's query and key are rotated by it."""
    rows, tokens, _ = x.shape
    kv, dim = attn.kv_heads, attn.head_dim
    group = attn.heads // kv
    out = []
    for m in range(rows):
        b = m // candidates
        q = attn.q_norm(attn.q_proj(x[m]).view(tokens, attn.heads, dim)).transpose(0, 1)
        k = attn.k_norm(attn.k_proj(x[m]).view(tokens, kv, dim)).transpose(0, 1)
        v = attn.v_proj(x[m]).view(tokens, kv, dim).transpose(0, 1)
        if rotary is not None:
            q, _ = apply_rotary_pos_emb(q, q, *rotary, unsqueeze_dim=0)
            k, _ = apply_rotary_pos_emb(k, k, *rotary, unsqueeze_dim=0)
        real = key_mask[b]
        k = torch.cat([keys[b][:, real], k], 1).repeat_interleave(group, 0)  # (H, S, D)
        v = torch.cat([values[b][:, real], v], 1).repeat_interleave(group, 0)
        weights = torch.softmax(q @ k.transpose(1, 2) / dim**0.5, -1)
        out.append(attn.o_proj((weights @ v).transpose(0, 1).reshape(tokens, -1)))
    return torch.stack(out)


def _rope_table(tokens, dim, base=10000.0):
    """(cos, sin) (T, D) of plain RoPE at positions 0..T-1 (half-split layout)."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angle = torch.arange(tokens, dtype=torch.float32)[:, None] * inv  # (T, D/2)
    return torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()


@pytest.mark.parametrize("rotary", [False, True], ids=["shared-position", "rope"])
@pytest.mark.parametrize("heads", [2, 4], ids=["G1", "G2"])
@pytest.mark.parametrize("workspace", [False, True], ids=["concat", "workspace"])
def test_expert_attention_matches_naive_reference(heads, workspace, rotary):
    from srdrl.policy.expert import ExpertAttention, build_context

    torch.manual_seed(0)
    kv, dim, tokens, scenes, candidates, length = 2, 16, 5, 3, 2, 7
    attn = ExpertAttention(24, heads, kv, dim, 1e-6)
    keys = [torch.randn(scenes, kv, length, dim)]
    values = [torch.randn(scenes, kv, length, dim)]
    key_mask = torch.ones(scenes, length, dtype=torch.bool)
    key_mask[0, 5:] = False
    key_mask[2, 3:] = False
    keys[0][~key_mask.unsqueeze(1).expand(-1, kv, -1)] = 1e4  # padding must not matter
    x = torch.randn(scenes * candidates, tokens, 24)
    table = _rope_table(tokens, dim) if rotary else None
    ctx = build_context(keys, values, key_mask, candidates, tokens, heads // kv, workspace,
                        capacity=11 if workspace else None, action_rotary=table)
    with torch.no_grad():
        ours = attn(x, ctx.keys[0], ctx.values[0], ctx)
        reference = _naive_attention(attn, x, keys[0], values[0], key_mask, candidates, table)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- flow matching


def test_flow_loss_shapes_and_weights(policy, batch):
    with torch.no_grad():
        prefix = policy.encode_prefix(batch)
    targets = torch.randn(3, 4, 64, 2)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    with torch.no_grad():
        per = policy.flow_matching_loss(prefix, targets, generator=g(), reduction="none")
        assert per.shape == (3, 4) and torch.all(per > 0)
        weights = torch.rand(3, 4)
        weighted = policy.flow_matching_loss(prefix, targets, weights, generator=g())
        assert torch.allclose(weighted, (per * weights).mean())
        zero = policy.flow_matching_loss(prefix, targets, torch.zeros(3), generator=g())
        assert zero.item() == 0.0
        single = policy.flow_matching_loss(prefix, targets[:, 0], generator=g(), reduction="none")
        assert single.shape == (3,)
    with pytest.raises(ValueError, match="do not match"):
        policy.flow_matching_loss(prefix, torch.randn(2, 64, 2))


@pytest.mark.parametrize("stop_gradient", [False, True], ids=["joint", "insulated"])
def test_flow_loss_gradients(stop_gradient, batch):
    torch.manual_seed(0)
    p = VLAPolicy(PolicyConfig.tiny(stop_gradient_to_vlm=stop_gradient))
    prefix = p.encode_prefix(batch)
    p.flow_matching_loss(prefix, torch.randn(3, 64, 2)).backward()
    for name in ("expert", "action_in_proj", "action_out_proj"):
        grads = [q.grad for q in getattr(p, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name
    k_proj = p.vlm.model.language_model.layers[0].self_attn.k_proj.weight
    assert (k_proj.grad is None) == stop_gradient


def test_flow_matching_overfits_a_few_scenes():
    torch.manual_seed(0)
    config = PolicyConfig.tiny()
    p = VLAPolicy(config, build_tokenizer(config, REASONING))
    b = make_batch(num_scenes=3, seed=7)
    with torch.no_grad():
        prefix = p.encode_prefix(b)
    targets = p.action_space.traj_to_action(_smooth_paths(3), v0=torch.full((3,), 5.0))
    params = [q for n, q in p.named_parameters() if not n.startswith("vlm.")]
    opt = torch.optim.Adam(params, lr=3e-3)

    def eval_loss():
        with torch.no_grad():
            return p.flow_matching_loss(prefix, targets.unsqueeze(1).expand(-1, 32, -1, -1),
                                        generator=torch.Generator().manual_seed(0)).item()

    def sample_error():
        actions, _ = sample_trajectories(p, b, 2, generator=torch.Generator().manual_seed(1),
                                         prefix=prefix)
        return (actions - targets[:, None]).square().mean().item()

    before, error_before = eval_loss(), sample_error()
    g = torch.Generator().manual_seed(2)
    for _ in range(150):  # with 60 image tokens in the prefix (320x192 input) 100 gave 3x
        loss = p.flow_matching_loss(prefix, targets.unsqueeze(1).expand(-1, 4, -1, -1),
                                    generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, error_after = eval_loss(), sample_error()
    assert after < 0.25 * before, (before, after)
    assert error_after < 0.2 * error_before, (error_before, error_after)


def _smooth_paths(num_scenes):
    """Three distinct gentle paths at 5 m/s (straight, curving left, curving right)."""
    s = 5.0 * 0.1 * torch.arange(1, 65, dtype=torch.float32)  # (64,) arc length
    curvature = torch.tensor([0.0, 0.02, -0.03])[:num_scenes, None]
    heading = curvature * s
    x = torch.cumsum(0.5 * heading.cos(), -1)
    y = torch.cumsum(0.5 * heading.sin(), -1)
    return torch.stack([x, y, torch.zeros_like(x)], -1)  # (B, 64, 3)


# --------------------------------------------------------------------------- sampler


def test_sampler_shapes_and_determinism(policy, batch):
    def run(seed, **kw):
        return sample_trajectories(policy, batch, 4, steps=5,
                                   generator=torch.Generator().manual_seed(seed), **kw)

    actions, trajectories = run(0)
    assert actions.shape == (3, 4, 64, 2) and trajectories.shape == (3, 4, 64, 3)
    assert actions.dtype == trajectories.dtype == torch.float32
    assert torch.isfinite(trajectories).all()
    again, again_traj = run(0)
    assert torch.equal(actions, again) and torch.equal(trajectories, again_traj)
    other, _ = run(1)
    assert not torch.allclose(actions, other)
    # the trajectories are the action space's integration from the history's speed
    v0 = policy.action_space.estimate_v0(batch["ego_history_xyz"])
    expected = policy.action_space.action_to_traj(actions, v0[:, None])
    assert torch.allclose(trajectories, expected)
    # candidates of one scene share its prefix: with equal noise they are equal
    prefix = policy.encode_prefix(batch)
    x0 = initial_noise(3, 1, 64, 0.0, torch.Generator().manual_seed(4), "cpu").expand(3, 2, 64, 2)
    out = Denoiser().denoise(policy, prefix, x0, steps=3)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6)


class _PerSceneNoise:
    """A noise source with ``draw`` (like ``srdrl.policy.noise.SceneNoise``): one generator
    per scene, rows of a scene-major tensor drawn from their scene's generator."""

    def __init__(self, seeds):
        self.generators = [seeded(s) for s in seeds]

    def draw(self, sampler, shape, device):
        rows = shape[0] // len(self.generators)
        return torch.cat([sampler((rows, *shape[1:]), generator=g) for g in self.generators])


def test_noise_source_with_draw_is_used_scene_by_scene(policy):
    full = make_batch(num_scenes=3, seed=5)
    part = {k: v[1:] for k, v in full.items()}
    a_full, _ = sample_trajectories(policy, full, 2, steps=3, generator=_PerSceneNoise([7, 8, 9]))
    a_part, _ = sample_trajectories(policy, part, 2, steps=3, generator=_PerSceneNoise([8, 9]))
    torch.testing.assert_close(a_full[1:], a_part, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        prefix = policy.encode_prefix(full)
        per = policy.flow_matching_loss(prefix, torch.randn(3, 2, 64, 2),
                                        generator=_PerSceneNoise([1, 2, 3]), reduction="none")
    assert per.shape == (3, 2)


def test_initial_noise_scale_grows_with_candidate_index():
    x0 = initial_noise(64, 4, 64, 0.2, torch.Generator().manual_seed(0), "cpu")
    std = x0.std(dim=(0, 2, 3))
    assert torch.allclose(std, torch.tensor([1.0, 1.2, 1.4, 1.6]), rtol=0.05)


# --------------------------------------------------------------------------- checkpoints


def test_save_and_from_pretrained_round_trip(policy, batch, tmp_path):
    policy.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json"}
    loaded = VLAPolicy.from_pretrained(tmp_path).eval()
    assert loaded.config == policy.config
    ours, theirs = policy.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    with torch.no_grad():
        p1, p2 = policy.encode_prefix(batch), loaded.encode_prefix(batch)
        assert torch.equal(p1.language_loss, p2.language_loss)
    a1, t1 = sample_trajectories(policy, batch, 2, steps=3, generator=seeded(0))
    a2, t2 = sample_trajectories(loaded, batch, 2, steps=3, generator=seeded(0))
    assert torch.equal(a1, a2) and torch.equal(t1, t2)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        PolicyConfig.tiny(num_key_value_heads=3)
    with pytest.raises(ValueError, match="mrope_section"):
        PolicyConfig.tiny(head_dim=64)
    with pytest.raises(ValueError, match="unknown policy preset"):
        PolicyConfig.preset("huge")
    with pytest.raises(ValueError, match="action_encoder='v3'"):
        PolicyConfig.tiny(action_encoder="v3")
    with pytest.raises(ValueError, match="flow_time_distribution='logit'"):
        PolicyConfig.tiny(flow_time_distribution="logit")
    with pytest.raises(ValueError, match="fourier_max_frequency=0.01 must be at least"):
        PolicyConfig.tiny(fourier_max_frequency=0.01)
    bench = PolicyConfig.bench()
    assert bench.expert_hidden_size == 1024 and bench.num_layers == 8
    assert PolicyConfig.from_dict(bench.to_dict()) == bench


# --------------------------------------------------------------------------- CUDA graphs


@pytest.fixture(scope="module")
def cuda_policy():
    torch.manual_seed(0)
    config = PolicyConfig.tiny()
    return VLAPolicy(config, build_tokenizer(config, REASONING)).cuda().eval()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_graph_matches_eager(cuda_policy, dtype):
    denoiser = Denoiser()
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    for seed in (0, 1):  # the second call replays the graph with a new prefix and noise
        b = make_batch(num_scenes=3, seed=seed)
        with autocast, torch.no_grad():
            prefix = cuda_policy.encode_prefix(b)
            x0 = initial_noise(3, 4, 64, 0.2, torch.Generator().manual_seed(seed), "cuda")
            graph = denoiser.denoise(cuda_policy, prefix, x0, steps=10, use_cuda_graph=True)
            eager = denoiser.denoise(cuda_policy, prefix, x0, steps=10, use_cuda_graph=False)
        torch.testing.assert_close(graph, eager, atol=1e-5, rtol=1e-5)
    assert denoiser.captures == 1


@pytest.mark.gpu
@gpu
def test_graph_sees_weights_updated_by_optimizer():
    torch.manual_seed(0)
    config = PolicyConfig.tiny()
    p = VLAPolicy(config, build_tokenizer(config, REASONING)).cuda()
    b = make_batch(num_scenes=2, seed=0)
    denoiser = Denoiser()
    with torch.no_grad():
        prefix = p.encode_prefix(b)
    x0 = initial_noise(2, 3, 64, 0.2, torch.Generator().manual_seed(0), "cuda")
    before = denoiser.denoise(p, prefix, x0, steps=10)
    opt = torch.optim.AdamW(p.parameters(), lr=1e-2)
    p.flow_matching_loss(p.encode_prefix(b), torch.randn(2, 64, 2, device="cuda")).backward()
    opt.step()
    after_graph = denoiser.denoise(p, prefix, x0, steps=10)
    after_eager = denoiser.denoise(p, prefix, x0, steps=10, use_cuda_graph=False)
    assert denoiser.captures == 1
    assert not torch.allclose(before, after_graph, atol=1e-3)
    torch.testing.assert_close(after_graph, after_eager, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@gpu
def test_pinned_inputs_copied_asynchronously_give_the_same_prefix(cuda_policy):
    b = make_batch(num_scenes=3, seed=2)
    inputs = cuda_policy.input_builder(b)
    pinned = inputs.pin_memory()
    assert all(t.is_pinned() for t in vars(pinned).values())
    with torch.no_grad():
        from_pinned = cuda_policy.encode_prefix(b, pinned)  # non-blocking copies
        from_pageable = cuda_policy.encode_prefix(b, inputs)
    for name in ("language_loss", "vision_features", "key_mask"):
        torch.testing.assert_close(getattr(from_pinned, name), getattr(from_pageable, name),
                                   atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(from_pinned.keys[-1], from_pageable.keys[-1], atol=1e-6,
                               rtol=1e-6)
