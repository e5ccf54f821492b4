"""``VLAPolicy``: Qwen3-VL (reads images and prompt, teacher-forced on the reasoning) plus a
flow-matching action expert that attends to the VLM's per-layer keys/values.

Submodules, named as in the Alpamayo-R1 release: ``vlm`` (a
``transformers.Qwen3VLForConditionalGeneration``), ``expert`` (``ActionExpert``),
``action_in_proj`` (``action_proj.py``), ``action_out_proj`` (linear to 2 per waypoint) and
``action_space`` (unicycle; parameter-free).

Flow matching (docs/DESIGN.md, "Flow matching"): noise x0 ~ N(0, I), t from
``PolicyConfig.flow_time_distribution`` with t = 1 data, x_t = (1 - t) x0 + t x1, target
velocity x1 - x0, MSE per sample.

Precision: the policy may be cast to bf16 (``.to(torch.bfloat16)``) or run under autocast.
The prefix keys/values are kept in the dtype the VLM's attention consumed (the autocast dtype
under autocast, else the model's); the Fourier features, the loss and the Euler state are
float32. Checkpoints (``formats.py``): ``save_pretrained(dir)`` writes the layout the policy
was loaded from (srdrl's own, a Qwen3-VL folder, an Alpamayo-R1 folder) unless told another;
``from_pretrained(dir)`` reads any of them from a local folder.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DynamicCache,
    PreTrainedTokenizerFast,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
)

from srdrl.action_space import ActionSpace
from srdrl.policy.action_proj import build_action_in_proj
from srdrl.policy.config import PolicyConfig, vlm_fields
from srdrl.policy.expert import ActionExpert, ExpertContext, build_context, shift_rotary
from srdrl.policy.inputs import IGNORE_INDEX, VLMInputBuilder, VLMInputs, template_texts
from srdrl.policy.kv_recompute import recorded_layer_inputs
from srdrl.policy.tokenizer import special_token_ids, train_tokenizer

VLM_INPUTS_KEY = "vlm_inputs"
"""Batch key of ready-made ``VLMInputs`` (see ``srdrl.train.VLMCollate``)."""
BETA_TIME_SCALE = 0.999
"""The release's flow-matching times: t = 0.999 (1 - s), s ~ Beta(1.5, 1)."""

# transformers renamed the cache argument from ``past_key_values`` to ``cache`` (5.2x keeps
# the old name as a deprecated alias); pass whichever this version's forward declares.
_FORWARD_PARAMS = inspect.signature(Qwen3VLModel.forward).parameters
_CACHE_KWARG = "cache" if "cache" in _FORWARD_PARAMS else "past_key_values"
_ROPE_INDEX_TAKES_TYPES = (
    "mm_token_type_ids" in inspect.signature(Qwen3VLModel.get_rope_index).parameters
)


def draw(sampler, shape, generator, device) -> torch.Tensor:
    """``torch.randn``/``torch.rand`` (float32) on the generator's device, moved to ``device``:
    a CPU generator then gives the same numbers whatever device the policy is on.

    ``generator`` is None, a ``torch.Generator``, or any object with
    ``draw(sampler, shape, device)`` that fills a scene-major tensor (dim 0 = scenes x rows
    per scene), such as ``srdrl.policy.noise.SceneNoise``: every draw here is scene-major.
    """
    if hasattr(generator, "draw"):
        return generator.draw(sampler, shape, device)
    where = generator.device if generator is not None else device
    return sampler(shape, generator=generator, device=where, dtype=torch.float32).to(device)


def build_tokenizer(config: PolicyConfig, texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Train the policy's tokenizer over ``texts`` (the data's reasoning) and the prompt."""
    return train_tokenizer([*template_texts(), *texts], config.vocab_size)


def flow_times(u: torch.Tensor, distribution: str) -> torch.Tensor:
    """Flow-matching times from uniform draws ``u`` in [0, 1): 'uniform' gives u; 'beta' the
    release's 0.999 (1 - s) with s ~ Beta(1.5, 1), by its inverse CDF s = u^(2/3) (so the
    same draws as 'uniform', which keeps the per-scene noise streams unchanged)."""
    if distribution == "uniform":
        return u
    if distribution == "beta":
        return BETA_TIME_SCALE * (1.0 - u.pow(2.0 / 3.0))
    raise ValueError(f"unknown flow_time_distribution {distribution!r}")


@dataclass
class Prefix:
    """One VLM forward over B scenes (prompt + teacher-forced reasoning)."""

    keys: list[torch.Tensor]
    """Per layer (B, kv_heads, L, head_dim), RoPE shifted so the action tokens sit at 0."""
    values: list[torch.Tensor]
    """Per layer (B, kv_heads, L, head_dim)."""
    key_mask: torch.Tensor
    """(B, L) bool, True on real (non-padding) tokens."""
    action_position: torch.Tensor
    """(B,) long: the text position the action tokens take (one after the prefix's last)."""
    language_loss: torch.Tensor
    """Scalar: cross-entropy over each scene's reasoning tokens and closing token, averaged
    per scene, then over scenes."""
    vision_features: torch.Tensor
    """(B, text_hidden): mean of the image tokens' last-layer hidden states."""
    language_features: torch.Tensor
    """(B, text_hidden): mean of the reasoning tokens' last-layer hidden states."""

    def detach(self) -> Prefix:
        return Prefix(**{
            f.name: [t.detach() for t in v] if isinstance(v := getattr(self, f.name), list)
            else v.detach()
            for f in fields(self)
        })

    @property
    def num_scenes(self) -> int:
        return self.key_mask.shape[0]


class VLAPolicy(nn.Module):
    """The policy. ``vlm_config`` (a Qwen3-VL folder's) or a ready ``vlm`` module replace the
    VLM ``config`` would build; their sizes must agree with ``config``'s. ``layout`` is the
    checkpoint layout ``save_pretrained`` writes by default, ``layout_info`` what that
    layout needs to be written back (``formats.py`` fills both when loading)."""

    def __init__(self, config: PolicyConfig, tokenizer: PreTrainedTokenizerFast | None = None,
                 vlm_config: Qwen3VLConfig | None = None,
                 vlm: Qwen3VLForConditionalGeneration | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config)
        if len(self.tokenizer) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens, more than "
                             f"vocab_size={config.vocab_size}")
        token_ids = special_token_ids(self.tokenizer)
        if vlm is None:
            vlm = Qwen3VLForConditionalGeneration(vlm_config or config.vlm_config(token_ids))
        check_vlm_config(config, vlm.config)
        self.vlm = vlm
        self.layout = "srdrl"
        self.layout_info: dict = {}
        self.expert = ActionExpert(
            num_layers=config.num_layers,
            hidden=config.expert_hidden_size,
            intermediate=config.expert_intermediate_size,
            heads=config.expert_num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            eps=config.rms_norm_eps,
        )
        self.action_in_proj = build_action_in_proj(config)
        self.action_out_proj = nn.Linear(config.expert_hidden_size, config.action_dim)
        self.action_space = ActionSpace(config.action_mean, config.action_std)
        self.input_builder = VLMInputBuilder(self.tokenizer, config)

    @property
    def device(self) -> torch.device:
        return self.action_out_proj.weight.device

    # ------------------------------------------------------------------ VLM prefix
    def build_inputs(self, batch: dict) -> VLMInputs:
        return self.input_builder(batch).to(self.device)

    def encode_prefix(self, batch: dict, inputs: VLMInputs | None = None) -> Prefix:
        """One teacher-forced VLM forward: language loss, per-layer prefix keys/values, key
        padding mask and pooled vision/language features."""
        if inputs is None:  # built by the DataLoader's workers when it uses vlm_collate
            inputs = batch.get(VLM_INPUTS_KEY)
        inputs = self.build_inputs(batch) if inputs is None else inputs.to(self.device)
        model = self.vlm.model
        mask = inputs.attention_mask.bool()
        rope_kwargs = dict(
            image_grid_thw=inputs.image_grid_thw, attention_mask=inputs.attention_mask
        )
        if _ROPE_INDEX_TAKES_TYPES:
            rope_kwargs["mm_token_type_ids"] = inputs.mm_token_type_ids
        position_ids, _ = model.get_rope_index(inputs.input_ids, **rope_kwargs)  # (3, B, L)
        cache = DynamicCache()
        # gradient checkpointing turns the cache off: then the keys/values are recomputed
        # from each layer's recorded input (kv_recompute.py)
        with recorded_layer_inputs(self.vlm) as recorded:
            out = model(
                input_ids=inputs.input_ids,
                attention_mask=inputs.attention_mask,
                position_ids=position_ids,
                pixel_values=inputs.pixel_values,
                image_grid_thw=inputs.image_grid_thw,
                mm_token_type_ids=inputs.mm_token_type_ids,
                use_cache=recorded is None,
                **{_CACHE_KWARG: cache if recorded is None else None},
            )
        hidden = out.last_hidden_state  # (B, L, D), after the final norm

        # next-token loss only where the next token is labelled (reasoning + closing token)
        targets = inputs.labels[:, 1:]
        chosen = targets != IGNORE_INDEX
        logits = self.vlm.lm_head(hidden[:, :-1][chosen])  # (n, vocab)
        token_loss = F.cross_entropy(logits.float(), targets[chosen], reduction="none")  # (n,)
        # Mean per scene, then over scenes: a scene's weight does not depend on the length
        # of the others' reasoning, so any split of a batch over ranks gives the same loss.
        scene = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(
            targets)[chosen]  # (n,) scene of each labelled token
        per_scene = torch.zeros(targets.shape[0], device=targets.device).index_add_(
            0, scene, token_loss)
        counts = chosen.sum(1).clamp_min(1)
        language_loss = (per_scene / counts).mean()

        action_position = position_ids.masked_fill(~mask, 0).amax(dim=(0, 2)) + 1  # (B,)
        keys, values = self._prefix_kv(cache if recorded is None else recorded,
                                       action_position, hidden.device)
        return Prefix(
            keys=keys,
            values=values,
            key_mask=mask,
            action_position=action_position,
            language_loss=language_loss,
            vision_features=_masked_mean(hidden, inputs.mm_token_type_ids.bool()),
            language_features=_masked_mean(hidden, inputs.reasoning_mask),
        )

    def _prefix_kv(self, cache, action_position: torch.Tensor, device):
        """The cache's keys/values per layer, keys RoPE-shifted by -action_position, both in
        the dtype the VLM's attention consumed."""
        kv_dtype = None
        if torch.is_autocast_enabled(device.type):
            kv_dtype = torch.get_autocast_dtype(device.type)
        rotary = self.vlm.model.language_model.rotary_emb
        shift = (-action_position).view(1, -1, 1).expand(3, -1, 1)  # (3, B, 1)
        cos, sin = rotary(torch.empty(0, device=device), shift)  # (B, 1, head_dim) float32
        layers = cache.layers if hasattr(cache, "layers") else None
        filled = len(layers) if layers is not None else len(getattr(cache, "key_cache", []))
        if filled != self.config.num_layers:
            raise RuntimeError(
                f"the VLM filled {filled} of {self.config.num_layers} cache layers; gradient "
                "checkpointing on policy.vlm drops the cache, and the expert needs it"
            )
        keys, values = [], []
        for layer in range(self.config.num_layers):
            if layers is not None:
                k, v = layers[layer].keys, layers[layer].values
            else:  # caches before the per-layer objects
                k, v = cache.key_cache[layer], cache.value_cache[layer]
            dtype = kv_dtype or v.dtype
            keys.append(shift_rotary(k, cos[:, 0], sin[:, 0]).to(dtype))
            values.append(v.to(dtype))
        return keys, values

    # ------------------------------------------------------------------ action expert
    def expert_context(self, prefix: Prefix, candidates: int = 1, workspace: bool = False,
                       capacity: int | None = None) -> ExpertContext:
        """The expert's view of the prefix for B scenes x ``candidates`` rows (scene-major);
        see ``ExpertContext`` for ``workspace`` and ``capacity``."""
        keys, values = prefix.keys, prefix.values
        if self.config.stop_gradient_to_vlm:
            keys, values = [k.detach() for k in keys], [v.detach() for v in values]
        cfg = self.config
        return build_context(
            keys, values, prefix.key_mask, candidates, cfg.num_waypoints,
            cfg.expert_num_attention_heads // cfg.num_key_value_heads, workspace, capacity,
            self.action_rotary(prefix.key_mask.device),
        )

    def action_rotary(self, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) (T, head_dim) float32 of text positions 0..T-1 with the VLM's own RoPE
        frequencies (the prefix keys are shifted to match); None for the legacy encoder."""
        if self.config.action_encoder == "legacy":
            return None
        positions = torch.arange(self.config.num_waypoints, device=device)
        positions = positions.view(1, 1, -1).expand(3, 1, -1)  # (3, 1, T): t = h = w
        rotary = self.vlm.model.language_model.rotary_emb
        cos, sin = rotary(torch.empty(0, device=device), positions)  # (1, T, D) float32
        return cos[0], sin[0]

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: ExpertContext) -> torch.Tensor:
        """Predicted velocity (M, 64, 2) for x_t (M, 64, 2) at t (M,), context of M rows."""
        hidden = self.expert(self.action_in_proj(x_t, t), context)  # (M, 64, hidden)
        return self.action_out_proj(hidden)

    def flow_draws(self, target_actions: torch.Tensor, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The start noise x0 (B, K, 64, 2) and flow times t (B, K) that
        ``flow_matching_loss`` draws for targets (B, 64, 2) or (B, K, 64, 2), in its order
        (x0, then t), so they can be drawn early and passed back in (``draws``)."""
        x1 = target_actions.unsqueeze(1) if target_actions.dim() == 3 else target_actions
        x0 = draw(torch.randn, x1.flatten(0, 1).shape, generator, x1.device)  # (M, T, 2)
        t = flow_times(draw(torch.rand, x0.shape[:1], generator, x1.device),
                       self.config.flow_time_distribution)  # (M,)
        return x0.view(x1.shape), t.view(x1.shape[:2])

    def flow_matching_loss(
        self,
        prefix: Prefix,
        target_actions: torch.Tensor,
        weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
        draws: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Flow-matching MSE toward normalised actions (B, 64, 2) or (B, K, 64, 2) (K
        targets per scene, each with its own noise and t), in one expert call.

        Per sample: mean over (64, 2) of (v(x_t, t) - (x1 - x0))^2. ``weights`` (B,) or
        (B, K) multiply the per-sample losses and are not renormalised (AWR's exp(A / beta)
        keeps its scale; pass normalised weights for a convex combination). ``reduction``
        "mean" averages over all samples, "none" returns them (B,) or (B, K). ``draws``:
        x0 (B, K, 64, 2) and t (B, K) from ``flow_draws`` instead of drawing them here.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        single = target_actions.dim() == 3
        x1 = target_actions.unsqueeze(1) if single else target_actions  # (B, K, T, 2)
        batch, per_scene = x1.shape[:2]
        if batch != prefix.num_scenes or x1.shape[2:] != (self.config.num_waypoints, 2):
            raise ValueError(f"target_actions {tuple(target_actions.shape)} do not match "
                             f"{prefix.num_scenes} scenes x (..., 64, 2)")
        x0, t = draws if draws is not None else self.flow_draws(x1, generator)
        x1, x0, t = x1.flatten(0, 1).float(), x0.flatten(0, 1), t.flatten()  # (M, ...)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
        context = self.expert_context(prefix, candidates=per_scene)
        v = self.velocity(x_t, t, context).float()
        loss = (v - (x1 - x0)).square().mean((-2, -1)).view(batch, per_scene)  # (B, K)
        if weights is not None:
            weights = weights.to(loss)
            loss = loss * (weights.unsqueeze(1) if weights.dim() == 1 else weights)
        if reduction == "mean":
            return loss.mean()
        return loss[:, 0] if single else loss

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | Path, layout: str | None = None,
                        max_shard_size: int | str = "5GB") -> Path:
        """Write the policy to a local folder in ``layout`` ('srdrl', 'qwen3_vl' or
        'alpamayo_r1'; default: the layout it was loaded from), weights in shards of at most
        ``max_shard_size``. See ``formats.py``."""
        from srdrl.policy.formats import save_policy

        return save_policy(self, directory, layout or self.layout, max_shard_size)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device=None, dtype=None, **overrides
                        ) -> VLAPolicy:
        """Load a policy from a local folder in any layout ``formats.detect_layout`` knows.
        ``overrides`` replace config fields (``vlm_path``, ``init_seed``: see
        ``formats.load_policy``)."""
        from srdrl.policy.formats import load_policy

        policy = load_policy(directory, **overrides)
        if device is not None or dtype is not None:
            policy = policy.to(device=device, dtype=dtype)
        return policy

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload the folder ``save_pretrained`` writes to a Hugging Face Hub repository
        (``huggingface_hub``'s ``create_repo`` and ``upload_folder``); see ``hub.py``."""
        from srdrl.policy.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)


def check_vlm_config(config: PolicyConfig, vlm_config: Qwen3VLConfig) -> None:
    """The VLM sizes ``config`` states must be the VLM's (the expert is built from them)."""
    wrong = {name: (getattr(config, name), value)
             for name, value in vlm_fields(vlm_config).items() if getattr(config, name) != value}
    if wrong:
        raise ValueError("PolicyConfig disagrees with the VLM's config (field: policy, VLM): "
                         + ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in wrong.items()))


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D), (B, L) bool -> (B, D); zeros where the mask is empty."""
    weight = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weight).sum(1) / weight.sum(1).clamp_min(1.0)
