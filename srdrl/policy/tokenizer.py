"""A small byte-level BPE tokenizer for the policy's VLM, trained locally.

The release's Qwen tokenizer lives on the hub, and nothing is ever downloaded here, so the
tiny policy trains its own: byte-level BPE (any text encodes, unknown words fall back to
bytes) over the data's reasoning and the prompt templates, plus Qwen's chat and vision
special tokens and the Alpamayo trajectory marker. The special tokens come first, so their
ids are fixed (``SPECIAL_TOKENS[i]`` has id ``i``) whatever the training texts. The result
is a ``transformers.PreTrainedTokenizerFast``; it is saved with, and loaded from, the
policy's checkpoint directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
TRAJ_FUTURE_START = "<|traj_future_start|>"
TRAJ_FUTURE_END = "<|traj_future_end|>"

SPECIAL_TOKENS = (
    PAD,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
    TRAJ_FUTURE_START,
    TRAJ_FUTURE_END,
)
"""In id order: ``SPECIAL_TOKENS[i]`` gets id ``i``."""

MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
"""The special tokens plus the 256 byte symbols: a smaller vocabulary cannot encode text."""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE of at most ``vocab_size`` tokens over ``texts`` (the data's reasoning
    and the prompt templates), with ``SPECIAL_TOKENS`` at ids 0..8.

    The vocabulary may come out smaller than ``vocab_size`` when the texts have few
    distinct pairs left to merge; the VLM's embedding table is sized by ``vocab_size``.
    Deterministic for the same texts.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    texts = [t for t in texts if t]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """``transformers`` wrapper with pad ``<|endoftext|>`` and eos ``<|im_end|>`` (Qwen's)."""
    for i, token in enumerate(SPECIAL_TOKENS):
        if backend.token_to_id(token) != i:
            raise ValueError(
                f"special token {token} must have id {i}, has {backend.token_to_id(token)}"
            )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=IM_END,
        padding_side="right",
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by ``save_tokenizer`` from a local directory (never the hub)."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    for i, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != i:
            raise ValueError(f"{directory}: special token {token} does not have id {i}")
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Name -> id for every special token."""
    return {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
