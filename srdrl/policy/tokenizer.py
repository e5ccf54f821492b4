"""The policy's tokenizer: trained locally for the presets, or a Qwen tokenizer from a folder.

The presets train their own byte-level BPE (any text encodes, unknown words fall back to
bytes) over the data's reasoning and the prompt templates, plus Qwen's chat and vision
special tokens and the trajectory markers; nothing is downloaded. A Qwen3-VL or
Alpamayo-R1 folder brings its own tokenizer, extended with the release's trajectory tokens
(``add_trajectory_tokens``). Either way srdrl looks special tokens up by name, never by id.
The result is a ``transformers.PreTrainedTokenizerFast``, saved with, and loaded from, the
policy's folder.
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
"""The special tokens srdrl's prompt uses; a trained tokenizer gives them ids 0..8, a loaded
one wherever its vocabulary has them."""

TRAJ_TOKENS = (
    "<|traj_history|>",
    "<|traj_future|>",
    "<|traj_history_start|>",
    TRAJ_FUTURE_START,
    "<|traj_history_end|>",
    TRAJ_FUTURE_END,
)
"""The release's trajectory markers, in the order it adds them to a Qwen tokenizer."""

RELEASE_SPECIAL_TOKENS = tuple(f"<|{name}|>" for name in (
    "prompt_start", "prompt_end", "image_start", "image_pre_tkn", "image_end",
    "traj_history_start", "traj_history_pre_tkn", "traj_history_end", "cot_start", "cot_end",
    "meta_action_start", "meta_action_end", "traj_future_start", "traj_future_pre_tkn",
    "traj_future_end", "traj_history", "traj_future", "image_pad", "vectorized_wm",
    "vectorized_wm_start", "vectorized_wm_end", "vectorized_wm_pre_tkn", "route_start",
    "route_pad", "route_end", "question_start", "question_end", "answer_start", "answer_end",
))
"""What the release adds instead of ``TRAJ_TOKENS`` when its config sets
``add_special_tokens`` (same order)."""

MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
"""The special tokens plus the 256 byte symbols: a smaller vocabulary cannot encode text."""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE of at most ``vocab_size`` tokens over ``texts`` (the data's reasoning
    and the prompt templates), with ``SPECIAL_TOKENS`` first (ids 0..8).

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
    missing = [token for token in SPECIAL_TOKENS if backend.token_to_id(token) is None]
    if missing:
        raise ValueError(f"the tokenizer lacks the special tokens {missing}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=IM_END,
        padding_side="right",
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load the ``tokenizer.json`` tokenizer of a local directory (never the hub): srdrl's own,
    a Qwen3-VL folder's or an Alpamayo-R1 folder's. Its special tokens may sit at any ids."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int | None:
    """The id of ``token`` when the vocabulary has it as one token, else None (a tokenizer
    with an unknown token would otherwise answer with that token's id)."""
    i = tokenizer.convert_tokens_to_ids(token)
    return i if i is not None and tokenizer.convert_ids_to_tokens(i) == token else None


def special_token_ids(tokenizer: PreTrainedTokenizerFast, where: str = "the tokenizer"
                      ) -> dict[str, int]:
    """Name -> id for every token of ``SPECIAL_TOKENS``; a missing one is an error naming
    ``where`` the tokenizer came from."""
    ids = {token: token_id(tokenizer, token) for token in SPECIAL_TOKENS}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"{where} lacks the special tokens {missing}")
    return ids


def add_trajectory_tokens(tokenizer: PreTrainedTokenizerFast, traj_vocab_size: int,
                          release_specials: bool = False) -> int:
    """Extend a Qwen tokenizer as the release does: the discrete trajectory tokens
    ``<i0>`` .. ``<i{traj_vocab_size - 1}>`` (plain added tokens), then ``TRAJ_TOKENS`` (or,
    with ``release_specials``, ``RELEASE_SPECIAL_TOKENS``) as special tokens, so the ids match
    an Alpamayo-R1 model's. Tokens already present are kept where they are (a tokenizer
    saved after this call comes back unchanged). Returns how many tokens were added."""
    discrete = [f"<i{k}>" for k in range(traj_vocab_size)]
    added = tokenizer.add_tokens([t for t in discrete if token_id(tokenizer, t) is None])
    markers = RELEASE_SPECIAL_TOKENS if release_specials else TRAJ_TOKENS
    new = [t for t in markers if token_id(tokenizer, t) is None]
    return added + tokenizer.add_tokens(new, special_tokens=True)
