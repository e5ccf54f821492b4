"""``PolicyConfig``: the sizes of the VLM, the action expert and the image pipeline.

Two presets: ``tiny`` (the embedded default; trains on CPU in minutes) and ``bench`` (a
size worth timing on a GPU: expert hidden 1024, 8 layers, about 512 prefix tokens per
scene). The expert shares the VLM text model's layer count, KV heads and head_dim, because
it attends to the VLM's keys and values layer by layer; its hidden size is its own.
``vlm_fields`` reads the VLM fields back from a ``Qwen3VLConfig`` (a Qwen3-VL or
Alpamayo-R1 folder's), the inverse of ``PolicyConfig.vlm_config``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from transformers import Qwen3VLConfig

from srdrl.action_space import ACTION_MEAN, ACTION_STD
from srdrl.policy.tokenizer import (
    IMAGE_PAD,
    MIN_VOCAB_SIZE,
    PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)
from srdrl.timegrid import NUM_STEPS

ACTION_ENCODERS = ("fourier_v2", "legacy")
FLOW_TIME_DISTRIBUTIONS = ("uniform", "beta")
RELEASE_ACTION_FIELDS = dict(
    action_encoder="fourier_v2", action_in_num_layers=4, action_in_hidden_size=1024,
    fourier_frequencies=10, fourier_min_frequency=1.0, fourier_max_frequency=100.0,
    flow_time_distribution="beta",
)
"""The Alpamayo-R1 release's action-in projection and flow-matching times: what a Qwen3-VL
import starts its fresh projections with."""


@dataclass
class PolicyConfig:
    # --------------------------------------------------------------- VLM text model
    vocab_size: int = 1024
    """Rows of the VLM's embedding and output tables; the tokenizer is trained to at most
    this many tokens."""
    text_hidden_size: int = 128
    """Hidden size of the VLM's text decoder."""
    text_intermediate_size: int = 256
    """MLP width of the VLM's text decoder."""
    num_layers: int = 2
    """Decoder layers of the VLM text model, and therefore of the expert."""
    num_attention_heads: int = 4
    """Query heads of the VLM text model."""
    num_key_value_heads: int = 2
    """KV heads of the VLM text model and of the expert."""
    head_dim: int = 32
    """Per-head size, shared by the VLM and the expert."""
    mrope_section: tuple[int, int, int] = (6, 5, 5)
    """M-RoPE frequencies given to (time, height, width); sums to head_dim // 2."""
    rope_theta: float = 10000.0
    """RoPE base of the VLM text model."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm (VLM and expert)."""
    max_reasoning_tokens: int = 128
    """Reasoning text is cut to this many tokens (bounds the prefix length)."""
    pad_to_multiple_of: int = 16
    """Prefix lengths are padded up to a multiple of this (aligned attention masks)."""

    # --------------------------------------------------------------- vision tower
    vision_depth: int = 1
    """Transformer blocks of the vision tower."""
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_num_heads: int = 2
    patch_size: int = 16
    """Pixels per patch side."""
    spatial_merge_size: int = 2
    """Patches merged per side into one LLM token (merge_size^2 patches per token)."""
    temporal_patch_size: int = 2
    """Frames per temporal patch; a single image is repeated to fill it."""
    num_position_embeddings: int = 64
    """Learned vision position grid (a perfect square), resampled to each image's grid."""
    deepstack_visual_indexes: tuple[int, ...] = (0,)
    """Vision blocks whose features are added to the first LLM layers (DeepStack)."""
    image_min_pixels: int = 4096
    """Images are resized (aspect kept) to at least this many pixels..."""
    image_max_pixels: int = 160 * 96
    """...and at most this many; both sides become multiples of patch_size * merge_size.
    The tiny default turns a 320x192 frame into 160x96: 10x6 patches, 15 tokens."""

    # --------------------------------------------------------------- action expert
    expert_hidden_size: int = 128
    """Hidden size of the action expert (may be smaller than the VLM's)."""
    expert_intermediate_size: int = 256
    """MLP width of the action expert."""
    expert_num_attention_heads: int = 4
    """Query heads of the expert; a multiple of num_key_value_heads."""
    num_waypoints: int = NUM_STEPS
    """Action tokens, one per future step (64: 6.4 s at 10 Hz)."""
    action_dim: int = 2
    """Normalised acceleration and curvature."""
    action_encoder: str = "fourier_v2"
    """``action_in_proj`` and the action tokens' positions. 'fourier_v2': the release's
    per-waypoint encoder (Fourier features of each action value and of t, an MLP of
    ``action_in_num_layers`` RMSNorm'd layers, a LayerNorm), action token k sitting k text
    positions after the first; 'legacy': srdrl's first encoder (raw value plus power-of-two
    frequencies, a two-layer MLP, a learned embedding per waypoint, every action token at
    one position), kept so checkpoints written before the release structure still load."""
    action_in_num_layers: int = 2
    """Layers of the 'fourier_v2' encoder's MLP after its input layer (the release: 4)."""
    action_in_hidden_size: int | None = None
    """Width of the 'fourier_v2' encoder's MLP (the release: 1024); None: the expert's
    hidden size."""
    fourier_frequencies: int = 8
    """Frequencies per action value and per time t in ``action_in_proj``, each giving a sine
    and a cosine ('fourier_v2': log-spaced over [fourier_min_frequency,
    fourier_max_frequency] cycles per unit, the release uses 10; 'legacy': powers of two)."""
    fourier_min_frequency: float = 0.0625
    """Lowest frequency of the 'fourier_v2' encoder (the release: 1). With the default 1/16
    to 8 the small presets keep the frequencies of their first encoder: normalised actions
    and noise reach about +-5, and without periods that long a small MLP learns the
    velocity (linear in x_t) far more slowly."""
    fourier_max_frequency: float = 8.0
    """Highest frequency of the 'fourier_v2' encoder (the release: 100)."""

    # --------------------------------------------------------------- flow matching
    flow_time_distribution: str = "uniform"
    """Training times t of flow matching (t = 1 is data): 'uniform' U(0, 1), or 'beta', the
    release's 0.999 * (1 - s) with s ~ Beta(1.5, 1) (more weight near the noise end)."""
    action_mean: tuple[float, float] = ACTION_MEAN
    """Mean of (acceleration m/s^2, curvature 1/m) that normalises actions (the release's)."""
    action_std: tuple[float, float] = ACTION_STD
    """Std of (acceleration, curvature) that normalises actions (the release's)."""

    # --------------------------------------------------------------- checkpoint import
    traj_vocab_size: int = 768
    """Discrete trajectory tokens ``<i0>`` .. added to a Qwen3-VL tokenizer on import, as the
    release does (srdrl never predicts them; they keep the vocabulary an Alpamayo-R1
    model's). Unused by the presets' own tokenizer."""
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel mean the image processor subtracts (from preprocessor_config.json)."""
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel std the image processor divides by (from preprocessor_config.json)."""

    # --------------------------------------------------------------- training
    stop_gradient_to_vlm: bool = False
    """Detach the prefix keys/values before the expert, so the flow-matching and AWR losses
    train only the expert and projections ("knowledge insulation"); the VLM then learns
    from the language (and consistency) losses alone."""

    def __post_init__(self):
        self.mrope_section = tuple(int(x) for x in self.mrope_section)
        self.deepstack_visual_indexes = tuple(int(x) for x in self.deepstack_visual_indexes)
        for name in ("action_mean", "action_std", "image_mean", "image_std"):
            setattr(self, name, tuple(float(x) for x in getattr(self, name)))
        problems = []

        def need(ok: bool, msg: str):
            if not ok:
                problems.append(msg)

        for name in (
            "vocab_size", "text_hidden_size", "text_intermediate_size", "num_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vision_depth",
            "vision_hidden_size", "vision_intermediate_size", "vision_num_heads", "patch_size",
            "spatial_merge_size", "temporal_patch_size", "expert_hidden_size",
            "expert_intermediate_size", "expert_num_attention_heads", "fourier_frequencies",
            "max_reasoning_tokens", "pad_to_multiple_of", "action_in_num_layers",
            "fourier_min_frequency",
        ):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        need(self.vocab_size >= MIN_VOCAB_SIZE,
             f"vocab_size={self.vocab_size} must be at least {MIN_VOCAB_SIZE} (bytes + specials)")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads={self.num_attention_heads} must be a multiple of "
             f"num_key_value_heads={self.num_key_value_heads}")
        need(self.expert_num_attention_heads % self.num_key_value_heads == 0,
             f"expert_num_attention_heads={self.expert_num_attention_heads} must be a multiple "
             f"of num_key_value_heads={self.num_key_value_heads}")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even (RoPE pairs)")
        need(len(self.mrope_section) == 3 and sum(self.mrope_section) == self.head_dim // 2,
             f"mrope_section={self.mrope_section} must be 3 numbers summing to head_dim // 2 = "
             f"{self.head_dim // 2}")
        need(self.vision_hidden_size % self.vision_num_heads == 0,
             f"vision_hidden_size={self.vision_hidden_size} must be a multiple of "
             f"vision_num_heads={self.vision_num_heads}")
        need(all(0 <= i < self.vision_depth for i in self.deepstack_visual_indexes),
             f"deepstack_visual_indexes={self.deepstack_visual_indexes} must lie in "
             f"[0, vision_depth={self.vision_depth})")
        side = math.isqrt(self.num_position_embeddings)
        need(side * side == self.num_position_embeddings,
             f"num_position_embeddings={self.num_position_embeddings} must be a perfect square")
        factor = self.patch_size * self.spatial_merge_size
        need(factor * factor <= self.image_min_pixels <= self.image_max_pixels,
             f"need (patch_size*merge_size)^2={factor * factor} <= image_min_pixels="
             f"{self.image_min_pixels} <= image_max_pixels={self.image_max_pixels}")
        need(self.num_waypoints == NUM_STEPS,
             f"num_waypoints={self.num_waypoints} must be {NUM_STEPS} (the action space's)")
        need(self.action_dim == 2, f"action_dim={self.action_dim} must be 2 (accel, curvature)")
        need(self.action_encoder in ACTION_ENCODERS,
             f"action_encoder={self.action_encoder!r} must be one of {ACTION_ENCODERS}")
        need(self.fourier_max_frequency >= self.fourier_min_frequency,
             f"fourier_max_frequency={self.fourier_max_frequency} must be at least "
             f"fourier_min_frequency={self.fourier_min_frequency}")
        need(self.action_in_hidden_size is None or self.action_in_hidden_size > 0,
             f"action_in_hidden_size={self.action_in_hidden_size} must be positive or None")
        need(self.flow_time_distribution in FLOW_TIME_DISTRIBUTIONS,
             f"flow_time_distribution={self.flow_time_distribution!r} must be one of "
             f"{FLOW_TIME_DISTRIBUTIONS}")
        need(len(self.action_mean) == 2 and len(self.action_std) == 2
             and min(self.action_std) > 0,
             f"action_mean={self.action_mean} and action_std={self.action_std} must be 2 "
             "numbers each, the std positive")
        need(len(self.image_mean) == 3 and len(self.image_std) == 3 and min(self.image_std) > 0,
             f"image_mean={self.image_mean} and image_std={self.image_std} must be 3 numbers "
             "each, the std positive")
        need(self.traj_vocab_size >= 0, f"traj_vocab_size={self.traj_vocab_size} must be >= 0")
        if problems:
            raise ValueError("invalid PolicyConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **overrides) -> PolicyConfig:
        """The embedded default: ~1M parameters, trains on CPU in minutes. A 640x384 frame
        is seen at 320x192: 12 x 20 patches, 60 image tokens, enough for a hazard in the
        way of the generated data to fill several of them (tests/test_scenes.py)."""
        values = dict(image_max_pixels=320 * 192)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def bench(cls, **overrides) -> PolicyConfig:
        """A size worth timing on a GPU: VLM text 2048 wide, 8 layers, 16 heads / 8 KV heads
        of 128; expert 1024 wide with 8 heads of 128 (one per KV head, so no query-head
        folding copies); a 320x192 frame upscaled to 832x512 gives 416 image tokens, about
        512-560 prefix tokens with the prompt and reasoning."""
        values = dict(
            vocab_size=4096, text_hidden_size=2048, text_intermediate_size=6144, num_layers=8,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128,
            mrope_section=(24, 20, 20), rope_theta=5_000_000.0,
            vision_depth=2, vision_hidden_size=512, vision_intermediate_size=1536,
            vision_num_heads=8, num_position_embeddings=2304, deepstack_visual_indexes=(0, 1),
            image_min_pixels=400 * 32 * 32, image_max_pixels=512 * 32 * 32,
            expert_hidden_size=1024, expert_intermediate_size=3072,
            expert_num_attention_heads=8,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides) -> PolicyConfig:
        presets = {"tiny": cls.tiny, "bench": cls.bench}
        if name not in presets:
            raise ValueError(f"unknown policy preset {name!r}; choose one of {sorted(presets)}")
        return presets[name](**overrides)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PolicyConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PolicyConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    # ------------------------------------------------------------------ derived configs
    @property
    def action_in_width(self) -> int:
        """Width of the 'fourier_v2' encoder's MLP."""
        return self.action_in_hidden_size or self.expert_hidden_size

    def vlm_config(self, token_ids: dict[str, int]) -> Qwen3VLConfig:
        """The ``Qwen3VLConfig`` of the VLM, with the tokenizer's special-token ids."""
        text = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.text_hidden_size,
            intermediate_size=self.text_intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            pad_token_id=token_ids[PAD],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "mrope_section": list(self.mrope_section),
                "mrope_interleaved": True,
            },
        )
        vision = dict(
            depth=self.vision_depth,
            hidden_size=self.vision_hidden_size,
            intermediate_size=self.vision_intermediate_size,
            num_heads=self.vision_num_heads,
            patch_size=self.patch_size,
            spatial_merge_size=self.spatial_merge_size,
            temporal_patch_size=self.temporal_patch_size,
            out_hidden_size=self.text_hidden_size,
            num_position_embeddings=self.num_position_embeddings,
            deepstack_visual_indexes=list(self.deepstack_visual_indexes),
        )
        return Qwen3VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=token_ids[IMAGE_PAD],
            video_token_id=token_ids[VIDEO_PAD],
            vision_start_token_id=token_ids[VISION_START],
            vision_end_token_id=token_ids[VISION_END],
            tie_word_embeddings=False,
        )


def vlm_fields(vlm_config: Qwen3VLConfig) -> dict:
    """The ``PolicyConfig`` fields a ``Qwen3VLConfig`` determines (the inverse of
    ``PolicyConfig.vlm_config``). The expert's own fields are left out: the caller chooses
    them (the release copies the text model's, with overrides)."""
    text, vision = vlm_config.text_config, vlm_config.vision_config
    rope = dict(text.rope_parameters or {})
    if "mrope_section" not in rope or rope.get("rope_type", "default") != "default":
        raise ValueError(f"text_config.rope_parameters={rope}: srdrl needs the default M-RoPE "
                         "with an mrope_section")
    if vision.out_hidden_size != text.hidden_size:
        raise ValueError(f"vision_config.out_hidden_size={vision.out_hidden_size} differs from "
                         f"text_config.hidden_size={text.hidden_size}")
    return dict(
        vocab_size=text.vocab_size,
        text_hidden_size=text.hidden_size,
        text_intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        mrope_section=tuple(rope["mrope_section"]),
        rope_theta=float(rope["rope_theta"]),
        rms_norm_eps=text.rms_norm_eps,
        vision_depth=vision.depth,
        vision_hidden_size=vision.hidden_size,
        vision_intermediate_size=vision.intermediate_size,
        vision_num_heads=vision.num_heads,
        patch_size=vision.patch_size,
        spatial_merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        num_position_embeddings=vision.num_position_embeddings,
        deepstack_visual_indexes=tuple(vision.deepstack_visual_indexes),
    )
