"""The VLM's per-layer prefix keys/values under gradient checkpointing.

The expert reads the keys and values every VLM text layer computed for the prefix
(docs/DESIGN.md, "The policy"). Normally they come from the ``DynamicCache`` the VLM fills.
Under gradient checkpointing transformers turns the cache off, layer by layer: a
checkpointed layer runs its forward a second time during backward, and a cache written
inside it would be appended to twice. So with checkpointing on, the keys/values are
recomputed outside the checkpointed layers instead:

1. While the VLM runs, a forward pre-hook on each decoder layer keeps a reference to the
   layer's input hidden states (B, L, hidden) and to the rotary (cos, sin) it is given.
   Checkpointing keeps each layer's input alive until backward anyway, so this costs no
   memory. (The input of layer i + 1 already carries the DeepStack visual features added
   after layer i.)
2. Afterwards, per layer: ``input_layernorm`` -> ``k_proj``/``v_proj`` (with their LoRA
   adapters, if any) -> ``k_norm`` on each head -> RoPE with the same cos/sin: the same
   operations, on the same inputs, as the layer's attention, so the keys and values equal
   the cache's. This runs differentiably, itself checkpointed: only the (already held)
   input and the resulting keys/values stay in memory, and backward recomputes the norm
   and projections. The extra work is the key/value projections twice more per layer
   (about 4% of a Qwen3-VL-8B layer's matmuls).

Dropout inside the adapters draws a fresh mask for the recomputed projections, so under
``lora_dropout > 0`` the keys/values the expert reads are a different (equally valid) draw
than the ones the VLM's own attention used; with dropout off they are the same numbers.

``encode_prefix`` uses ``recorded_layer_inputs(vlm)`` around the VLM call; the object it
yields stands in for the cache (``.layers[i].keys`` / ``.values``, (B, KV, L, head_dim)).
When checkpointing is off it yields None and the cache path runs as before.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def set_vlm_gradient_checkpointing(policy: nn.Module, enabled: bool = True) -> None:
    """Checkpoint every layer of ``policy.vlm`` (text decoder and vision blocks), or stop.
    Non-reentrant: gradients reach the adapters even when no layer input requires grad
    (frozen embeddings under LoRA). transformers 5 renamed the methods to
    ``activation_checkpointing_*``; older versions have only ``gradient_checkpointing_*``."""
    vlm, kwargs = policy.vlm, {"use_reentrant": False}
    if not enabled:
        getattr(vlm, "activation_checkpointing_disable", vlm.gradient_checkpointing_disable)()
    elif hasattr(vlm, "activation_checkpointing_enable"):
        vlm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_drops_cache(vlm: nn.Module) -> bool:
    """True when the VLM's text layers run checkpointed, which turns their cache off."""
    layers = vlm.model.language_model.layers
    return vlm.training and any(getattr(layer, "gradient_checkpointing", False) for layer in layers)


@dataclass
class LayerKV:
    keys: torch.Tensor
    """(B, kv_heads, L, head_dim), RoPE applied at the prefix's own positions."""
    values: torch.Tensor
    """(B, kv_heads, L, head_dim)."""


def layer_keys_values(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a Qwen3-VL text decoder layer's attention computes as keys/values from the
    layer input ``hidden`` (B, L, hidden) and its rotary cos/sin (B, L, head_dim)."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    heads = (*hidden.shape[:-1], -1, attn.head_dim)  # (B, L, KV, D)
    keys = attn.k_norm(attn.k_proj(normed).view(heads)).transpose(1, 2)  # (B, KV, L, D)
    values = attn.v_proj(normed).view(heads).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, L, D): shared by the KV heads
    half = keys.shape[-1] // 2
    rotated = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
    return keys * cos + rotated * sin, values


class LayerInputs:
    """Each text layer's recorded input; ``layers`` recomputes the keys/values on first
    access (after the VLM call, so outside the checkpointed layers)."""

    def __init__(self, decoder_layers: nn.ModuleList):
        self.decoder_layers = decoder_layers
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._layers: list[LayerKV] | None = None

    def hook(self, index: int):
        def record(module, args, kwargs):
            if index in self.inputs:  # a layer called again inside one forward: keep the first
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs \
                else args[1]
            self.inputs[index] = (hidden, cos, sin)
        return record

    @property
    def layers(self) -> list[LayerKV]:
        if self._layers is None:
            self._layers = []
            for index in range(len(self.inputs)):  # stops at the first layer not recorded
                if index not in self.inputs:
                    break
                layer = self.decoder_layers[index]
                hidden, cos, sin = self.inputs[index]
                if torch.is_grad_enabled():
                    keys, values = checkpoint(layer_keys_values, layer, hidden, cos, sin,
                                              use_reentrant=False)
                else:
                    keys, values = layer_keys_values(layer, hidden, cos, sin)
                self._layers.append(LayerKV(keys, values))
            self.inputs.clear()  # the recomputation (or its checkpoint) holds what it needs
        return self._layers


@contextmanager
def recorded_layer_inputs(vlm: nn.Module):
    """Around one VLM forward: yields a ``LayerInputs`` when checkpointing drops the cache
    (then pass ``use_cache=False`` and read the keys/values from it), else None."""
    if not checkpointing_drops_cache(vlm):
        yield None
        return
    decoder_layers = vlm.model.language_model.layers
    recorder = LayerInputs(decoder_layers)
    handles = [layer.register_forward_pre_hook(recorder.hook(i), with_kwargs=True)
               for i, layer in enumerate(decoder_layers)]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
