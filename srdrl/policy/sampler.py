"""Flow-matching sampler: N candidates per scene, all B * N in one batch, optionally replayed
from a CUDA graph.

``sample_trajectories`` encodes the VLM prefix once per scene (or takes one), draws the
candidates' start noise x0 = eps * (1 + noise_scale_step * i), i = 0..N-1, runs Euler over
the fixed grid t_k = k / steps (x <- x + v(x, t_k) / steps) and integrates the actions into
trajectories with v0 from the ego history. The loop alone is ``Denoiser.denoise``, so it can
be timed without the VLM.

The N candidates of a scene share its prefix keys/values (see ``expert.py``): they are
copied once per call into workspace buffers of B scenes with N * 64 trailing slots for the
candidates' action tokens, never per candidate and never per step.

CUDA graphs. The loop reads only static tensors: x0, the expert context (the workspace and
the attention bias) and the parameters, in place. So ``Denoiser`` captures the whole loop
once per shape key (scenes, rows, prefix length rounded up to ``length_bucket``, steps,
dtypes, autocast state) after a warm-up on a side stream, and each call thereafter copies
the prefix and the noise (drawn outside the graph) into the static buffers and replays.
A graph captured before an optimiser step sees the new weights after it, because
optimisers update parameters in place; if a parameter is replaced (``.to()``, loading with
``assign=True``) the stored data pointers no longer match and the loop is captured again.
Autocast inside the graph runs with its weight-cast cache off, so casts are recomputed from
the current weights on every replay. ZeRO-3 gathers and frees parameters through hooks and
cannot be captured: call with ``use_cuda_graph=False`` inside ``GatheredParameters`` there,
or sample from a ``srdrl.policy.replica.SamplingReplica`` (refreshed while gathered).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from srdrl.policy.expert import ExpertContext, fill_context
from srdrl.policy.model import Prefix, VLAPolicy, draw


def initial_noise(
    num_scenes: int,
    num_samples: int,
    num_waypoints: int,
    noise_scale_step: float,
    generator: torch.Generator | None,
    device,
) -> torch.Tensor:
    """x0 (B, N, T, 2) float32: standard normal scaled by 1 + noise_scale_step * i for
    candidate i: more spread for the later candidates of a scene (docs/DESIGN.md,
    "Sampling and CUDA graphs")."""
    eps = draw(torch.randn, (num_scenes, num_samples, num_waypoints, 2), generator, device)
    scale = 1.0 + noise_scale_step * torch.arange(num_samples, device=device, dtype=torch.float32)
    return eps * scale.view(1, -1, 1, 1)


def euler_loop(policy: VLAPolicy, x0: torch.Tensor, context: ExpertContext, steps: int
               ) -> torch.Tensor:
    """x0 (M, T, 2) float32 -> x_1 (M, T, 2) float32: Euler from t = 0 to 1 in ``steps``."""
    x = x0
    for k in range(steps):
        t = torch.full(x0.shape[:1], k / steps, device=x0.device)  # (M,)
        x = x + policy.velocity(x, t, context).float() * (1.0 / steps)
    return x


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


def _autocast(device: torch.device, state: tuple[bool, torch.dtype]):
    # keep the caller's autocast, but without the weight-cast cache (stale inside a graph)
    if not state[0]:
        return nullcontext()
    return torch.autocast(device.type, dtype=state[1], cache_enabled=False)


def _param_pointers(policy: VLAPolicy) -> tuple:
    """What a captured loop depends on besides its static inputs: data pointer and dtype of
    every parameter and buffer the expert and projections read (recursively, so the
    lora_A/lora_B weights peft adds inside the expert's layers are included), and the
    Python-side switches that change which kernels get recorded: each module's training
    flag (dropout) and, on a peft LoRA layer, merged / disabled / active adapters / scaling.
    A change in any of them forces a new capture."""
    modules = (policy.expert, policy.action_in_proj, policy.action_out_proj)
    tensors = itertools.chain.from_iterable(
        itertools.chain(m.parameters(), m.buffers()) for m in modules
    )
    switches = tuple(
        (sub.training, *(
            (tuple(sub.merged_adapters), sub.disable_adapters, tuple(sub.active_adapters),
             tuple(sorted(sub.scaling.items())))
            if hasattr(sub, "merged_adapters") else ()))
        for m in modules for sub in m.modules()
    )
    return tuple((t.data_ptr(), t.dtype) for t in tensors), switches


@dataclass
class _CapturedLoop:
    graph: torch.cuda.CUDAGraph
    x0: torch.Tensor  # (M, T, 2) static input
    context: ExpertContext  # static workspace buffers
    out: torch.Tensor  # (M, T, 2) static output
    pointers: tuple  # parameter data pointers at capture


class Denoiser:
    """The Euler loop of one policy, eager or from CUDA graphs cached per shape key (at most
    ``max_graphs``, least recently used dropped)."""

    def __init__(self, max_graphs: int = 4, length_bucket: int = 64, warmup_iters: int = 2):
        self.max_graphs = max_graphs
        self.length_bucket = length_bucket
        self.warmup_iters = warmup_iters
        self._graphs: OrderedDict[tuple, _CapturedLoop] = OrderedDict()
        self.captures = 0
        """How many graphs were captured (for tests and logs)."""

    def clear(self) -> None:
        self._graphs.clear()

    @torch.no_grad()
    def denoise(self, policy: VLAPolicy, prefix: Prefix, x0: torch.Tensor, steps: int,
                use_cuda_graph: bool = True) -> torch.Tensor:
        """x0 (B, N, T, 2) -> actions (B, N, T, 2) float32, prefix of B scenes."""
        batch, samples = x0.shape[:2]
        if batch != prefix.num_scenes:
            raise ValueError(f"x0 has {batch} scenes, the prefix {prefix.num_scenes}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        device = prefix.key_mask.device
        x0 = x0.to(device=device, dtype=torch.float32).flatten(0, 1)  # (M, T, 2)
        state = _autocast_state(device)
        # eager uses the graph's padded prefix capacity too: same shapes, same kernels, so
        # graph and eager outputs are identical
        capacity = math.ceil(prefix.keys[0].shape[2] / self.length_bucket) * self.length_bucket
        if use_cuda_graph and device.type == "cuda":
            out = self._replay(policy, prefix, x0, steps, state, capacity)
        else:
            context = policy.expert_context(prefix, samples, workspace=True, capacity=capacity)
            with _autocast(device, state):
                out = euler_loop(policy, x0, context, steps)
        return out.view(batch, samples, *out.shape[1:])

    def _replay(self, policy, prefix, x0, steps, state, capacity) -> torch.Tensor:
        scenes, rows = prefix.num_scenes, x0.shape[0]
        key = (scenes, rows, capacity, steps, tuple(x0.shape[1:]), prefix.keys[0].dtype,
               prefix.values[0].dtype, len(prefix.keys), x0.device, state)
        pointers = _param_pointers(policy)
        entry = self._graphs.get(key)
        if entry is None or entry.pointers != pointers:
            entry = self._capture(policy, prefix, x0, steps, capacity, state, pointers)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        fill_context(entry.context, prefix.keys, prefix.values, prefix.key_mask)
        entry.x0.copy_(x0)
        entry.graph.replay()
        return entry.out.clone()

    def _capture(self, policy, prefix, x0, steps, capacity, state, pointers) -> _CapturedLoop:
        context = policy.expert_context(prefix, x0.shape[0] // prefix.num_scenes,
                                        workspace=True, capacity=capacity)
        static_x0 = x0.clone()
        side = torch.cuda.Stream(device=x0.device)
        side.wait_stream(torch.cuda.current_stream(x0.device))
        with torch.cuda.stream(side), _autocast(x0.device, state):
            for _ in range(self.warmup_iters):
                euler_loop(policy, static_x0, context, steps)
        torch.cuda.current_stream(x0.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), _autocast(x0.device, state):
            out = euler_loop(policy, static_x0, context, steps)
        self.captures += 1
        return _CapturedLoop(graph, static_x0, context, out, pointers)


_DENOISERS: weakref.WeakKeyDictionary[VLAPolicy, Denoiser] = weakref.WeakKeyDictionary()


def denoiser_for(policy: VLAPolicy) -> Denoiser:
    """The policy's denoiser (its graph cache), created on first use."""
    if policy not in _DENOISERS:
        _DENOISERS[policy] = Denoiser()
    return _DENOISERS[policy]


@torch.no_grad()
def sample_trajectories(
    policy: VLAPolicy,
    batch: dict,
    num_samples: int,
    steps: int = 10,
    noise_scale_step: float = 0.2,
    generator: torch.Generator | None = None,
    use_cuda_graph: bool = True,
    prefix: Prefix | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num_samples`` candidates per scene.

    Returns normalised actions (B, N, 64, 2) and ego-frame trajectories (B, N, 64, 3),
    float32. ``prefix`` reuses a prefix already encoded for ``batch`` (e.g. the training
    step's); otherwise the VLM runs once here. A ``generator`` makes the noise reproducible
    (a CPU generator gives the same noise on every device).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if prefix is None:
        prefix = policy.encode_prefix(batch)
    device = prefix.key_mask.device
    x0 = initial_noise(prefix.num_scenes, num_samples, policy.config.num_waypoints,
                       noise_scale_step, generator, device)  # (B, N, T, 2)
    actions = denoiser_for(policy).denoise(policy, prefix, x0, steps, use_cuda_graph)
    history = batch["ego_history_xyz"].to(device=device, dtype=torch.float32)
    v0 = policy.action_space.estimate_v0(history)  # (B,)
    trajectories = policy.action_space.action_to_traj(actions, v0.unsqueeze(1))  # (B, N, T, 3)
    return actions, trajectories
