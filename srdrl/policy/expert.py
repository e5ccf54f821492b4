"""The action expert: a decoder stack that reads the VLM's keys/values layer by layer.

Each of the expert's layers has the VLM text decoder's layer structure and parameter names
(``layers.{i}.self_attn.{q,k,v,o}_proj``, ``q_norm``, ``k_norm``, ``mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``, final ``norm``), so release weights load by
name. Its hidden size may be smaller than the VLM's; layer count, KV heads and head_dim are
the VLM's, since layer i attends to the VLM layer i's keys/values of the prefix (prompt +
reasoning) followed by the 64 action tokens' own keys/values: non-causal among the action
tokens, padding keys masked. Attention is plain ``scaled_dot_product_attention``, no cache
object, so a forward is a pure function of its input tensors (CUDA-graph capturable).

Positions. As in the release, action token k sits at text position P + k, P one past the
prefix's last position (where the next generated token would go). RoPE scores depend only
on the difference of positions, so the policy rotates the prefix keys once by -P
(``shift_rotary``) and the action queries/keys by k alone: a (T, head_dim) table that is the
same for every call (``ExpertContext.action_rotary``), and the scores are those of the
release's positions. The M-RoPE position of an image token differs per frequency section
(t, h, w); shifting every frequency by the same text position is exactly what rotating a
query at (P, P, P) would do. The legacy encoder puts all action tokens at P (no table: their
order comes from its waypoint embedding).

Candidates share their scene's prefix. The M = B * N rows (scene-major) of a call are N
candidates of each of B scenes. Rather than copying a scene's prefix keys/values N times,
attention runs per scene: the queries of all N candidates (and the G query heads that share
a KV head) are folded into the query axis, N * G * 64 queries per KV head, against the
scene's prefix followed by the N candidates' own 64 keys each; the bias masks padding and
lets each candidate see only its own action keys. That reads each prefix once per scene
instead of N times, and with G == 1 the folding is a view, not a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, parameter ``weight`` (Qwen3's RMSNorm, fused kernel)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


@dataclass
class ExpertContext:
    """What the action tokens of B scenes x N candidates attend to (rows b * N + n).

    ``keys[i]``/``values[i]``: (B, kv_heads, S, head_dim) for layer i, the scene's prefix,
    shared by its candidates. With ``workspace=False`` S is the prefix length L and each call
    concatenates the candidates' own keys/values (N * T) after it (autograd-safe: training).
    With ``workspace=True`` S = C + N * T (prefix capacity C >= L) and each call writes them
    into the last N * T slots in place (sampling under no_grad; static buffers for graphs).
    ``attn_bias``: (B, 1, N * G * T, C + N * T) additive: 0 on the scene's real prefix
    tokens and on the query's own candidate's T slots, -inf elsewhere. ``action_rotary``:
    (cos, sin), each (T, head_dim) float32, rotating action token k's query and key by
    position k; None leaves them unrotated (all at the prefix's next position).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    attn_bias: torch.Tensor
    num_candidates: int
    num_action_tokens: int
    workspace: bool
    action_rotary: tuple[torch.Tensor, torch.Tensor] | None = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE rotation of ``x`` (..., D) by angles whose cos/sin broadcast against it (Qwen's
    half-split layout); computed in float32, returned in ``x``'s dtype."""
    y = x.float()
    return (y * cos.float() + rotate_half(y) * sin.float()).to(x.dtype)


def shift_rotary(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE-encoded keys (B, H, L, D) further by the angles whose cos/sin are (B, D)."""
    return rotate(keys, cos[:, None, None], sin[:, None, None])


def attention_bias(key_mask: torch.Tensor, capacity: int, candidates: int, group: int,
                   tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, N * G * T, capacity + N * T) additive bias; ``key_mask`` (B, L) True on real
    prefix tokens, L <= capacity (slots L..capacity-1 are masked)."""
    batch, length = key_mask.shape
    device, inf = key_mask.device, float("-inf")
    prefix = torch.full((batch, capacity), inf, dtype=dtype, device=device)  # (B, C)
    prefix[:, :length].masked_fill_(key_mask, 0.0)
    own = torch.eye(candidates, dtype=torch.bool, device=device).repeat_interleave(tokens, 1)
    own = torch.zeros(own.shape, dtype=dtype, device=device).masked_fill_(~own, inf)  # (N, N*T)
    rows = candidates * group * tokens
    own = own[:, None, None].expand(-1, group, tokens, -1).reshape(rows, -1)  # (N*G*T, N*T)
    bias = torch.cat([prefix[:, None].expand(-1, rows, -1), own.expand(batch, -1, -1)], -1)
    return bias[:, None]


def build_context(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    key_mask: torch.Tensor,
    candidates: int,
    num_action_tokens: int,
    group: int,
    workspace: bool,
    capacity: int | None = None,
    action_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ExpertContext:
    """Context for B scenes x ``candidates`` rows. ``keys``/``values``: per layer
    (B, kv_heads, L, head_dim); ``key_mask``: (B, L) bool, True on real tokens; ``group``:
    query heads per KV head; ``capacity`` (workspace only, default L): prefix slots;
    ``action_rotary``: see ``ExpertContext``."""
    if workspace:
        capacity = keys[0].shape[2] if capacity is None else capacity
        ctx = empty_context(capacity, candidates, num_action_tokens, group, keys, values,
                            action_rotary)
        fill_context(ctx, keys, values, key_mask)
        return ctx
    bias = attention_bias(key_mask, keys[0].shape[2], candidates, group, num_action_tokens,
                          keys[0].dtype)
    return ExpertContext(list(keys), list(values), bias, candidates, num_action_tokens, False,
                         action_rotary)


def empty_context(capacity: int, candidates: int, num_action_tokens: int, group: int,
                  keys: list[torch.Tensor], values: list[torch.Tensor],
                  action_rotary: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> ExpertContext:
    """Zeroed workspace shaped for prefixes like ``keys``/``values`` (B scenes, per layer) of
    up to ``capacity`` tokens: a longer capacity lets differently padded batches share one
    shape, the extra slots masked."""
    batch, heads, _, head_dim = keys[0].shape
    slots = capacity + candidates * num_action_tokens
    dev = keys[0].device
    rows = candidates * group * num_action_tokens

    def buffer(dtype):  # (B, KV, S, D) view of token-major (B, S, KV, D) memory, the layout
        # the projections produce: the per-step write of the action keys is a plain copy
        return torch.zeros(batch, slots, heads, head_dim, dtype=dtype, device=dev).transpose(1, 2)

    return ExpertContext(
        keys=[buffer(k.dtype) for k in keys],
        values=[buffer(v.dtype) for v in values],
        attn_bias=torch.zeros(batch, 1, rows, slots, dtype=keys[0].dtype, device=dev),
        num_candidates=candidates,
        num_action_tokens=num_action_tokens,
        workspace=True,
        action_rotary=action_rotary,
    )


def fill_context(ctx: ExpertContext, keys: list[torch.Tensor], values: list[torch.Tensor],
                 key_mask: torch.Tensor) -> None:
    """Copy a prefix (per layer (B, kv_heads, L, head_dim)) and its mask into a workspace."""
    batch, _, length, _ = keys[0].shape
    own = ctx.num_candidates * ctx.num_action_tokens
    capacity = ctx.keys[0].shape[2] - own
    if batch != ctx.keys[0].shape[0] or length > capacity or len(keys) != len(ctx.keys):
        raise ValueError(f"a prefix of {batch} scenes x {length} tokens x {len(keys)} layers "
                         f"does not fit a context of {ctx.keys[0].shape[0]} scenes x "
                         f"{capacity} tokens x {len(ctx.keys)} layers")
    for dst, src in zip(ctx.keys + ctx.values, list(keys) + list(values), strict=True):
        dst[:, :, :length].copy_(src)
    group = ctx.attn_bias.shape[2] // own
    ctx.attn_bias.copy_(attention_bias(key_mask, capacity, ctx.num_candidates, group,
                                       ctx.num_action_tokens, ctx.attn_bias.dtype))


class ExpertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor,
                ctx: ExpertContext) -> torch.Tensor:
        rows, tokens, _ = x.shape
        batch, n = prefix_keys.shape[0], ctx.num_candidates
        kv, group, dim = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        q = self.q_norm(self.q_proj(x).view(batch, n, tokens, kv, group, dim))
        k = self.k_norm(self.k_proj(x).view(batch, n, tokens, kv, dim))
        v = self.v_proj(x).view(batch, n, tokens, kv, dim)
        if ctx.action_rotary is not None:
            cos, sin = ctx.action_rotary  # (T, D): token k at position k
            q = rotate(q, cos[:, None, None], sin[:, None, None])
            k = rotate(k, cos[:, None], sin[:, None])
        # (B, KV, N*T, D) and (B, KV, N*G*T, D): candidates (and query groups) folded into the
        # sequence axis; views when G == 1
        k = k.permute(0, 3, 1, 2, 4).reshape(batch, kv, n * tokens, dim)
        v = v.permute(0, 3, 1, 2, 4).reshape(batch, kv, n * tokens, dim)
        q = q.permute(0, 3, 1, 4, 2, 5).reshape(batch, kv, n * group * tokens, dim)
        if ctx.workspace:
            prefix_keys[:, :, -n * tokens:].copy_(k)
            prefix_values[:, :, -n * tokens:].copy_(v)
            keys, values = prefix_keys, prefix_values  # (B, KV, C + N*T, D)
        else:
            keys = torch.cat([prefix_keys, k.to(prefix_keys.dtype)], dim=2)  # (B, KV, L+N*T, D)
            values = torch.cat([prefix_values, v.to(prefix_values.dtype)], dim=2)
        out = F.scaled_dot_product_attention(
            q.to(keys.dtype), keys, values.to(keys.dtype), attn_mask=ctx.attn_bias
        )  # (B, KV, N*G*T, D)
        out = out.view(batch, kv, n, group, tokens, dim).permute(0, 2, 4, 1, 3, 5)
        return self.o_proj(out.reshape(rows, tokens, kv * group * dim).to(x.dtype))


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ExpertLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int, kv_heads: int,
                 head_dim: int, eps: float):
        super().__init__()
        self.self_attn = ExpertAttention(hidden, heads, kv_heads, head_dim, eps)
        self.mlp = ExpertMLP(hidden, intermediate)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, x, prefix_keys, prefix_values, ctx: ExpertContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), prefix_keys, prefix_values, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class ActionExpert(nn.Module):
    """``layers`` + final ``norm``; (M, T, hidden) action embeddings -> (M, T, hidden)."""

    def __init__(self, num_layers: int, hidden: int, intermediate: int, heads: int,
                 kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(
            ExpertLayer(hidden, intermediate, heads, kv_heads, head_dim, eps)
            for _ in range(num_layers)
        )
        self.norm = RMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, ctx: ExpertContext) -> torch.Tensor:
        if len(ctx.keys) != len(self.layers):
            raise ValueError(f"context has {len(ctx.keys)} layers, the expert {len(self.layers)}")
        for layer, keys, values in zip(self.layers, ctx.keys, ctx.values, strict=True):
            x = layer(x, keys, values, ctx)
        return self.norm(x)
