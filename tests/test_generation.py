"""Reasoning generation: prompt layout, agreement with a cache-free greedy decode, stopping,
determinism under a seed, batching equals one scene at a time, the three modes."""

import pytest
import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer, sample_trajectories
from srdrl.policy.generation import (
    GumbelSampling,
    generate_reasoning,
    reasoning_prefix,
    sample_with_reasoning,
    stop_token_ids,
    unwritable_token_ids,
)
from srdrl.policy.noise import SceneNoise
from srdrl.policy.tokenizer import IM_END, SPECIAL_TOKENS, TRAJ_FUTURE_START

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# the tiny VLM is taught these; the second ends at the trajectory token, not <|im_end|>
TEXTS = ["Mud on the left at 12 m; steer right.",
         f"Clear track ahead; keep straight.{TRAJ_FUTURE_START}", "Rocks across the track; stop."]
SPOKEN = ["Mud on the left at 12 m; steer right.", "Clear track ahead; keep straight.",
          "Rocks across the track; stop."]


def make_batch(seed: int = 1) -> dict:
    """Three scenes of different speeds and yaw rates (prompts of different lengths) and
    images."""
    g = torch.Generator().manual_seed(seed)
    speeds = torch.tensor([3.0, 6.0, 9.9])
    curvature = torch.tensor([0.0, 0.03, -0.0131])  # yaw rates 0, +0.18, -0.13 rad/s
    history = torch.zeros(3, 16, 3)
    history[..., 0] = torch.arange(-15, 1) * 0.1 * speeds[:, None]
    history[..., 1] = curvature[:, None] * history[..., 0] ** 2 / 2
    return {"images": torch.randint(0, 256, (3, 1, 64, 64, 3), dtype=torch.uint8, generator=g),
            "ego_history_xyz": history, "reasoning_text": list(TEXTS), "index": [0, 1, 2]}


def scene(batch: dict, b: int) -> dict:
    return {k: v[b:b + 1] for k, v in batch.items()}


def untrained_policy(max_reasoning_tokens: int = 12) -> VLAPolicy:
    """Random weights; generation is cut at ``max_reasoning_tokens`` by default."""
    torch.manual_seed(0)
    config = PolicyConfig.tiny(max_reasoning_tokens=max_reasoning_tokens)
    return VLAPolicy(config, build_tokenizer(config, TEXTS)).eval()


@pytest.fixture(scope="module")
def trained():
    """A tiny policy taught to say TEXTS[b] for scene b (language loss only)."""
    policy = untrained_policy(max_reasoning_tokens=48)
    batch = make_batch()
    inputs = policy.build_inputs(batch)
    optimiser = torch.optim.Adam(policy.vlm.parameters(), lr=3e-3)
    for _ in range(120):
        loss = policy.encode_prefix(batch, inputs).language_loss
        if loss.item() < 0.02:
            break
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.02, f"the tiny VLM did not learn its texts (loss {loss.item()})"
    return policy.eval(), batch


def test_prompt_is_the_teacher_forced_sequence_up_to_the_answer():
    policy = untrained_policy()
    batch = make_batch()
    builder = policy.input_builder
    prompt = builder.prompt(batch)
    forced = builder(batch)
    lengths = prompt.attention_mask.sum(1).tolist()
    assert len(set(lengths)) > 1  # the batch exercises left padding
    width = prompt.input_ids.shape[1]
    assert width % policy.config.pad_to_multiple_of == 0
    for b, n in enumerate(lengths):
        assert prompt.attention_mask[b, : width - n].sum() == 0  # padding on the left
        ids = prompt.input_ids[b, width - n:]
        assert torch.equal(ids, forced.input_ids[b, :n])
        assert forced.labels[b, n - 1] == -100 and forced.labels[b, n] != -100  # answer next
        assert policy.tokenizer.decode(ids[-3:]).endswith("assistant\n")
    assert torch.equal(prompt.mm_token_type_ids.bool(), prompt.input_ids == builder.image_pad_id)
    assert torch.equal(prompt.pixel_values, forced.pixel_values)

    # given ids in place of the text give the same inputs; no reasoning leaves im_end only
    ids = policy.tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    given = builder.with_reasoning(batch, ids)
    assert all(torch.equal(getattr(given, k), getattr(forced, k)) for k in
               ("input_ids", "attention_mask", "labels", "reasoning_mask"))
    bare = builder.without_reasoning(batch)
    for b, n in enumerate(lengths):
        tail = policy.tokenizer.convert_ids_to_tokens(bare.input_ids[b, n:n + 3].tolist())
        assert tail[0] == IM_END and tail[2] == TRAJ_FUTURE_START
        assert not bare.reasoning_mask[b].any() and bare.attention_mask[b].sum() == n + 3


def test_greedy_generation_equals_a_cache_free_decode():
    """The batched, cached, left-padded generate gives the tokens of a loop that runs the
    whole sequence through the VLM again for every token, one scene at a time (and never
    picks a token reasoning cannot contain)."""
    policy = untrained_policy()
    batch = make_batch()
    out = generate_reasoning(policy, batch, max_new_tokens=6)
    builder = policy.input_builder
    stops = stop_token_ids(policy)
    for b in range(3):
        prompt = builder.prompt(scene(batch, b))
        ids = prompt.input_ids[prompt.attention_mask.bool()].view(1, -1)
        written = []
        while len(written) < 6 and not (written and written[-1] in stops):
            with torch.no_grad():
                logits = policy.vlm(
                    input_ids=ids, attention_mask=torch.ones_like(ids),
                    mm_token_type_ids=(ids == builder.image_pad_id).int(),
                    pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                    use_cache=False).logits
            last = logits[:, -1].clone()
            last[:, unwritable_token_ids(policy)] = float("-inf")
            written.append(int(last.argmax()))
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
        policy.vlm.model.rope_deltas = None
        stopped = written[-1] in stops
        assert out.stopped[b] == stopped and out.token_ids[b] == written[:-1 if stopped else 6]
    assert sum(len(t) for t in out.token_ids) >= 6  # the comparison saw real decoding


def test_trained_policy_stops_at_either_end_token(trained):
    policy, batch = trained
    out = generate_reasoning(policy, batch)
    assert out.texts == SPOKEN
    assert out.stopped == [True, True, True]
    ids = policy.tokenizer(SPOKEN, add_special_tokens=False)["input_ids"]
    assert out.token_ids == ids  # the stop token itself is not part of the text

    cut = generate_reasoning(policy, batch, max_new_tokens=3)
    assert cut.stopped == [False] * 3 and cut.token_ids == [t[:3] for t in ids]
    assert cut.texts == [policy.tokenizer.decode(t[:3]).strip() for t in ids]


def test_generated_text_equal_to_the_dataset_gives_the_oracle_prefix(trained):
    policy, batch = trained
    oracle = {**batch, "reasoning_text": SPOKEN}  # as the policy says them
    a_gen, t_gen, texts = sample_with_reasoning(policy, oracle, 2, "generated",
                                                generator=SceneNoise([1, 2, 3]))
    a_orc, t_orc, texts_orc = sample_with_reasoning(policy, oracle, 2, "oracle",
                                                    generator=SceneNoise([1, 2, 3]))
    assert texts == texts_orc == SPOKEN
    assert torch.equal(a_gen, a_orc) and torch.equal(t_gen, t_orc)
    a_none, _, texts_none = sample_with_reasoning(policy, oracle, 2, "none",
                                                  generator=SceneNoise([1, 2, 3]))
    assert texts_none == ["", "", ""] and not torch.allclose(a_none, a_orc)


def test_shapes_of_the_three_modes():
    policy = untrained_policy()
    batch = make_batch()
    for mode in ("generated", "oracle", "none"):
        actions, trajs, texts = sample_with_reasoning(policy, batch, 4, mode, steps=2,
                                                      max_new_tokens=4)
        assert actions.shape == (3, 4, 64, 2) and trajs.shape == (3, 4, 64, 3)
        assert len(texts) == 3 and torch.isfinite(trajs).all()
    short = reasoning_prefix(policy, batch, "none").key_mask.sum(1)
    full = reasoning_prefix(policy, batch, "oracle").key_mask.sum(1)
    assert (short < full).all()
    with pytest.raises(ValueError, match="mode"):
        sample_with_reasoning(policy, batch, 2, "dataset")
    with pytest.raises(ValueError, match="temperature"):
        generate_reasoning(policy, batch, temperature=-1.0)


def test_sampling_is_deterministic_under_a_seed_and_varies_with_it():
    policy = untrained_policy()
    batch = make_batch()

    def texts(noise, **kw):
        return generate_reasoning(policy, batch, 8, temperature=1.0, generator=noise,
                                  **kw).token_ids

    assert texts(SceneNoise([1, 2, 3])) == texts(SceneNoise([1, 2, 3]))
    assert texts(SceneNoise([1, 2, 3])) != texts(SceneNoise([4, 5, 6]))
    one = texts(torch.Generator().manual_seed(7))
    assert one == texts(torch.Generator().manual_seed(7))
    assert texts(SceneNoise([1, 2, 3]), top_p=0.9) == texts(SceneNoise([1, 2, 3]), top_p=0.9)
    greedy = generate_reasoning(policy, batch, 8).token_ids
    assert greedy == generate_reasoning(policy, batch, 8).token_ids
    assert greedy != texts(SceneNoise([1, 2, 3]))


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_batch_equals_one_scene_at_a_time(temperature):
    policy = untrained_policy()
    batch = make_batch()
    actions, trajs, texts = sample_with_reasoning(
        policy, batch, 3, steps=3, generator=SceneNoise([11, 12, 13]),
        text_generator=SceneNoise([21, 22, 23]), max_new_tokens=8, temperature=temperature)
    for b in range(3):
        a1, t1, text1 = sample_with_reasoning(
            policy, scene(batch, b), 3, steps=3, generator=SceneNoise([11 + b]),
            text_generator=SceneNoise([21 + b]), max_new_tokens=8, temperature=temperature)
        assert text1 == texts[b : b + 1]
        torch.testing.assert_close(a1[0], actions[b], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(t1[0], trajs[b], rtol=1e-4, atol=1e-4)


def test_a_finished_row_draws_no_noise_and_keeps_its_scores():
    stop = 5
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    before = [g.get_state() for g in generators]
    processor = GumbelSampling(generators, prompt_length=2, stop_ids=[stop])
    ids = torch.tensor([[9, 9, 3, stop], [9, 9, 3, 4]])  # row 0 has finished
    scores = torch.randn(2, 10)
    out = processor(ids, scores)
    assert torch.equal(out[0], scores[0]) and not torch.equal(out[1], scores[1])
    assert torch.equal(generators[0].get_state(), before[0])
    assert not torch.equal(generators[1].get_state(), before[1])


def test_gumbel_sampling_draws_from_the_tempered_nucleus():
    """Frequencies of argmax(warped logits + Gumbel noise) over many rows match
    softmax(logits / T) renormalised over the top-p nucleus."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    temperature, top_p, rows = 0.7, 0.9, 40_000
    chain = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p),
                                 GumbelSampling(torch.Generator().manual_seed(0), 1, [99])])
    ids = torch.zeros(rows, 1, dtype=torch.long)
    picks = chain(ids, logits.expand(rows, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=5).double() / rows
    probs = torch.softmax(logits[0].double() / temperature, 0)
    order = probs.sort(descending=True)
    keep = torch.zeros(5, dtype=torch.bool)
    keep[order.indices[(order.values.cumsum(0) - order.values) < top_p]] = True
    expected = torch.where(keep, probs, 0.0)
    expected /= expected.sum()
    assert keep.sum() < 5  # the nucleus drops something here
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_generation_on_cuda_in_bf16_matches_batching():
    policy = untrained_policy().to("cuda", torch.bfloat16)
    batch = make_batch()
    out = generate_reasoning(policy, batch, 8)
    assert [generate_reasoning(policy, scene(batch, b), 8).token_ids[0] for b in range(3)] \
        == out.token_ids
    actions, trajs, _ = sample_with_reasoning(policy, batch, 2, generator=SceneNoise([1, 2, 3]),
                                              max_new_tokens=8)
    assert trajs.is_cuda and torch.isfinite(trajs).all()
    ref = sample_trajectories(policy, batch, 2, generator=SceneNoise([1, 2, 3]),
                              prefix=reasoning_prefix(policy, batch, "generated", out))
    torch.testing.assert_close(actions, ref[0])


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_compiled_decode_writes_the_eager_tokens_on_cuda():
    """Static cache + transformers' compiled decode step (CUDA graphs) in float32 gives the
    tokens of the eager dynamic-cache decode."""
    policy = untrained_policy().to("cuda")
    batch = make_batch()
    eager = generate_reasoning(policy, batch, 8).token_ids
    assert generate_reasoning(policy, batch, 8, compile_decode=True).token_ids == eager
    assert generate_reasoning(policy, batch, 8, compile_decode=True).token_ids == eager


def test_reasoning_never_contains_special_or_unknown_tokens():
    """With every logit equal, greedy decoding takes the first allowed id, <|im_end|> (the
    pad and <|im_start|> before it are suppressed), and sampling draws uniformly from the
    allowed ids only: never an <|image_pad|>, which would corrupt the prefix, nor an id
    the tokenizer cannot decode."""
    policy = untrained_policy()
    with torch.no_grad():
        policy.vlm.lm_head.weight.zero_()
    batch = make_batch()
    greedy = generate_reasoning(policy, batch, 8)
    assert greedy.token_ids == [[], [], []] and greedy.stopped == [True] * 3
    sampled = generate_reasoning(policy, batch, 12, temperature=1.0,
                                 generator=SceneNoise([1, 2, 3]))
    ids = [t for row in sampled.token_ids for t in row]
    specials = {policy.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert ids and not set(ids) & specials and max(ids) < len(policy.tokenizer)
    assert len(policy.tokenizer) < policy.config.vocab_size  # unknown ids were possible
    actions, _, _ = sample_with_reasoning(policy, batch, 2, steps=2, max_new_tokens=12,
                                          temperature=1.0, text_generator=SceneNoise([1, 2, 3]))
    assert torch.isfinite(actions).all()
