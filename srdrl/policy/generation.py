"""Reasoning generation and sampling conditioned on it, as Alpamayo-R1 infers.

Two stages (docs/DESIGN.md, "Reasoning generation"):

1. ``generate_reasoning``: the VLM continues the prompt (system, images, ego motion, task,
   ``<|im_start|>assistant\\n``; left-padded) with ``policy.vlm.generate``: batched, one KV
   cache, M-RoPE positions from ``mm_token_type_ids``/``image_grid_thw`` (transformers
   keeps the per-row position offsets of a left-padded batch), stopping a row at
   ``<|im_end|>`` or ``<|traj_future_start|>`` or after ``max_new_tokens``, never writing
   another special token (``unwritable_token_ids``).
2. ``reasoning_prefix``: the prefix the expert reads is the teacher-forced layout with the
   generated token ids where the dataset's reasoning goes (``VLMInputBuilder.with_reasoning``)
   encoded by ``policy.encode_prefix``; the expert then denoises against it as in training.

Cost of stage 2: one more VLM forward over prompt + reasoning (the prompt's keys/values
are computed a second time), instead of reusing the generation cache. Reusing it would
mean re-laying a left-padded cache whose finished rows hold pad tokens after their stop
token into the right-padded layout the expert and its CUDA graph expect, per layer; the
extra forward is one prefill, small beside the decode steps that precede it
(``benchmarks/bench_generation.py`` times both), and it makes the generated prefix the
same computation as a teacher-forced one, so a generated text equal to the dataset's gives
the oracle prefix exactly.

Written by hand, because ``generate`` cannot do it: sampling. ``generate(do_sample=True)``
draws with ``torch.multinomial`` from the global RNG, so a batch's texts depend on which
scenes share it and on anything else that used the RNG. Here sampling is greedy decoding
over Gumbel-perturbed log-probabilities (argmax of log p + Gumbel noise is a draw from p,
the Gumbel-max trick), the noise drawn in a ``LogitsProcessor`` from each scene's own
generator (a ``SceneNoise``) or from one ``torch.Generator``, and only for rows that are
still generating: a scene's text then depends on its own seed only, in any batch.
Temperature and top-p are transformers' own warpers, applied before the noise.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import (
    CompileConfig,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen3VLForConditionalGeneration,
)
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from srdrl.policy.inputs import PromptInputs
from srdrl.policy.model import Prefix, VLAPolicy
from srdrl.policy.sampler import sample_trajectories
from srdrl.policy.tokenizer import IM_END, SPECIAL_TOKENS, TRAJ_FUTURE_START

REASONING_MODES = ("generated", "oracle", "none")
"""generated: the policy's own text (inference, the honest mode); oracle: the dataset's
text teacher-forced (what training conditions on; a diagnostic at evaluation, since the
synthetic text states the answer); none: no reasoning in the prefix at all."""

STOP_TOKENS = (IM_END, TRAJ_FUTURE_START)
# transformers before mm_token_type_ids existed found image tokens by id, and generate
# rejects a keyword the model's forward does not declare: pass it where it is declared
_FORWARD_TAKES_TYPES = "mm_token_type_ids" in inspect.signature(
    Qwen3VLForConditionalGeneration.forward).parameters


@dataclass
class GeneratedReasoning:
    texts: list[str]
    """Per scene, the decoded reasoning (special tokens dropped)."""
    token_ids: list[list[int]]
    """Per scene, the generated ids before the stop token."""
    stopped: list[bool]
    """Per scene, whether it ended at a stop token (False: cut at max_new_tokens)."""


class GumbelSampling(LogitsProcessor):
    """Adds Gumbel noise to the (already warped) scores of unfinished rows, so that greedy
    decoding samples from softmax(scores). Row b draws from ``generators[b]`` when a list
    is given (one per scene), else all unfinished rows draw from one generator (or the
    global RNG for None). A row is finished once it has produced a stop token."""

    def __init__(self, generator, prompt_length: int, stop_ids: list[int]):
        self.generator = generator
        self.prompt_length = prompt_length
        self.stop_ids = torch.tensor(stop_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor
                 ) -> torch.FloatTensor:
        new = input_ids[:, self.prompt_length:]
        done = torch.isin(new, self.stop_ids.to(new.device)).any(-1).cpu()  # (B,)
        rows = (~done).nonzero().flatten().tolist()
        if not rows:
            return scores
        vocab = scores.shape[-1]
        if isinstance(self.generator, list | tuple):
            uniform = torch.cat([torch.rand(1, vocab, generator=self.generator[b])
                                 for b in rows])
        else:
            where = self.generator.device if self.generator is not None else scores.device
            uniform = torch.rand(len(rows), vocab, generator=self.generator, device=where)
        uniform = uniform.to(scores.device).clamp(1e-10, 1.0 - 1e-7)  # (rows, V)
        gumbel = -torch.log(-torch.log(uniform))
        scores = scores.clone()
        index = torch.tensor(rows, device=scores.device)
        scores[index] = scores[index] + gumbel.to(scores.dtype)
        return scores


def _scene_generators(generator):
    """A SceneNoise's per-scene generators, or the generator (or None) itself."""
    return list(generator.generators) if hasattr(generator, "generators") else generator


def stop_token_ids(policy: VLAPolicy) -> list[int]:
    """Ids of ``<|im_end|>`` and ``<|traj_future_start|>``, where a row's reasoning ends."""
    return [policy.tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]


def unwritable_token_ids(policy: VLAPolicy) -> list[int]:
    """Ids reasoning never contains, suppressed in generation: the special tokens other than
    the stop tokens (an ``<|image_pad|>`` in the text would be taken for an image token when
    the prefix is encoded) and the embedding rows past the tokenizer's vocabulary."""
    stops = set(stop_token_ids(policy))
    special = {policy.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS} - stops
    return sorted(special | set(range(len(policy.tokenizer), policy.config.vocab_size)))


@torch.no_grad()
def generate_tokens(policy: VLAPolicy, prompt: PromptInputs, max_new_tokens: int,
                    **options) -> torch.Tensor:
    """``policy.vlm.generate`` continuing a prepared prompt, greedy, stopping rows at the
    stop tokens and never writing ``unwritable_token_ids``: the new tokens (B, n), pad
    after a row's stop. The VLM runs in eval mode
    (a KV cache even where gradient checkpointing is on for training). ``options`` go to
    ``generate`` as they are (a logits processor; ``cache_implementation="static"`` and a
    ``compile_config`` for a compiled decode step, as the benchmark does)."""
    vlm = policy.vlm
    if _FORWARD_TAKES_TYPES:
        options["mm_token_type_ids"] = prompt.mm_token_type_ids
    was_training = vlm.training
    vlm.eval()
    try:
        sequences = vlm.generate(
            input_ids=prompt.input_ids,
            attention_mask=prompt.attention_mask,
            pixel_values=prompt.pixel_values,
            image_grid_thw=prompt.image_grid_thw,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(policy),
            pad_token_id=policy.input_builder.pad_id,
            suppress_tokens=unwritable_token_ids(policy),
            use_cache=True,
            **options,
        )
    finally:
        vlm.train(was_training)
        # generate leaves the batch's M-RoPE offsets on the model; drop them so that no
        # later forward without explicit positions picks them up
        vlm.model.rope_deltas = None
    return sequences[:, prompt.input_ids.shape[1]:]


@torch.no_grad()
def generate_reasoning(
    policy: VLAPolicy,
    batch: dict,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator=None,
    compile_decode: bool = False,
) -> GeneratedReasoning:
    """The policy's reasoning for each scene of ``batch`` (images, ego history).

    ``temperature`` 0 is greedy (the default; no randomness). Above 0 the next token is
    drawn from softmax(logits / temperature) within the top-p nucleus, with noise from
    ``generator``: a ``SceneNoise`` (per-scene streams: the same text for a scene in any
    batch), a ``torch.Generator``, or None (global RNG). ``max_new_tokens`` defaults to the
    policy's ``max_reasoning_tokens``. ``compile_decode`` (CUDA): a static KV cache and
    transformers' torch.compile of the decode step in "reduce-overhead" mode (CUDA graphs);
    the first call of each batch shape compiles (see benchmarks/bench_generation.py).
    """
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, "
                         f"{top_p}")
    limit = policy.config.max_reasoning_tokens if max_new_tokens is None else max_new_tokens
    if limit < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {limit}")
    tokenizer = policy.tokenizer
    stop_ids = stop_token_ids(policy)
    prompt = policy.input_builder.prompt(batch).to(policy.device)
    processors = LogitsProcessorList()
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        processors.append(GumbelSampling(_scene_generators(generator),
                                         prompt.input_ids.shape[1], stop_ids))
    options = {}
    if compile_decode and prompt.input_ids.is_cuda:
        options = {"cache_implementation": "static",
                   "compile_config": CompileConfig(mode="reduce-overhead")}
    new_tokens = generate_tokens(policy, prompt, limit, logits_processor=processors, **options)
    token_ids, stopped = [], []
    for row in new_tokens.tolist():
        ends = [i for i, t in enumerate(row) if t in stop_ids]
        stopped.append(bool(ends))
        token_ids.append(row[: ends[0]] if ends else row)
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    return GeneratedReasoning([t.strip() for t in texts], token_ids, stopped)


@torch.no_grad()
def reasoning_prefix(policy: VLAPolicy, batch: dict, mode: str,
                     reasoning: GeneratedReasoning | None = None) -> Prefix:
    """The expert's prefix for ``mode``: ``generated`` needs ``reasoning`` (its token ids go
    in as generated), ``oracle`` teacher-forces the dataset's text, ``none`` has none."""
    builder = policy.input_builder
    if mode == "generated":
        if reasoning is None:
            raise ValueError("mode 'generated' needs the generated reasoning")
        inputs = builder.with_reasoning(batch, reasoning.token_ids)
    elif mode == "oracle":
        inputs = builder(batch)
    elif mode == "none":
        inputs = builder.without_reasoning(batch)
    else:
        raise ValueError(f"mode must be one of {REASONING_MODES}, got {mode!r}")
    vlm = policy.vlm
    was_training = vlm.training
    vlm.eval()
    try:
        return policy.encode_prefix(batch, inputs.to(policy.device))
    finally:
        vlm.train(was_training)


@torch.no_grad()
def sample_with_reasoning(
    policy: VLAPolicy,
    batch: dict,
    num_samples: int,
    mode: str = "generated",
    steps: int = 10,
    noise_scale_step: float = 0.2,
    generator=None,
    text_generator=None,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_cuda_graph: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """B scenes x ``num_samples`` trajectories conditioned on the reasoning of ``mode``.

    Returns normalised actions (B, N, 64, 2), ego-frame trajectories (B, N, 64, 3) and the
    B reasoning texts the expert read (generated; the dataset's for oracle; "" for none).
    ``generator`` drives the trajectories' start noise exactly as in
    ``sample_trajectories``, ``text_generator`` the text sampling (only used when
    ``temperature`` > 0); pass ``SceneNoise`` objects for batch-independent results.
    """
    if mode not in REASONING_MODES:
        raise ValueError(f"mode must be one of {REASONING_MODES}, got {mode!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    reasoning = None
    if mode == "generated":
        reasoning = generate_reasoning(policy, batch, max_new_tokens, temperature, top_p,
                                       text_generator)
        texts = reasoning.texts
    elif mode == "oracle":
        texts = list(batch["reasoning_text"])
    else:
        texts = [""] * batch["images"].shape[0]
    prefix = reasoning_prefix(policy, batch, mode, reasoning)
    actions, trajectories = sample_trajectories(
        policy, batch, num_samples, steps, noise_scale_step, generator, use_cuda_graph, prefix)
    return actions, trajectories, texts

