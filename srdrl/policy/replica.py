"""A copy of the policy's sampling side that a CUDA graph can replay under ZeRO-3.

At ZeRO-3 the policy's parameters are partitioned: each exists whole only while DeepSpeed's
hooks have gathered it, at an address that changes from one gather to the next, so the
Euler loop cannot be captured and runs eagerly (10 expert calls per step, each through the
hooks). ``SamplingReplica`` holds its own copies of what the loop reads (the action expert
and the two action projections, LoRA layers included), refreshed in place from the
gathered parameters once per optimiser step (the micro-steps of gradient accumulation
reuse the copy: the weights change only at the step), outside the engine's forward pass
(where a ``GatheredParameters`` can be released). The loop then reads only the replica, whose
addresses never change, so ``srdrl.policy.sampler.Denoiser`` captures it once and
replays it, as at ZeRO-0-2. The price: one whole copy of the expert per rank (its bf16
weights) and one gather of it per step, which eager sampling paid too.

Built from the policy while its parameters are still whole (before
``deepspeed.initialize``); not a submodule of anything DeepSpeed wraps, so ZeRO neither
partitions nor optimises it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from srdrl.policy.model import VLAPolicy

SAMPLING_MODULES = ("expert", "action_in_proj", "action_out_proj")
"""The policy's submodules the Euler loop reads (``VLAPolicy.velocity``)."""


class SamplingReplica:
    """Stands in for the policy in ``sample_trajectories`` given a prefix: ``config``,
    ``action_space``, ``expert_context`` and ``velocity`` as the policy's, the sampling
    modules its own copies (in eval mode: no dropout while sampling)."""

    def __init__(self, policy: VLAPolicy):
        self._policy = policy
        self.config = policy.config
        self.action_space = policy.action_space  # parameter-free: shared, not copied
        for name in SAMPLING_MODULES:
            module = copy.deepcopy(getattr(policy, name)).eval()
            module.requires_grad_(False)
            setattr(self, name, module)
        self.refreshes = 0
        """How many times the weights were copied in (for tests and logs)."""
        self.version = None
        """The optimiser step whose weights the copy holds (``refresh``'s ``version``)."""
        self.fresh = False
        """Refreshed since it was last sampled from (``take``)."""

    expert_context = VLAPolicy.expert_context
    velocity = VLAPolicy.velocity

    def action_rotary(self, device):
        # the VLM's rotary frequencies are a buffer, never partitioned: the policy's own
        return self._policy.action_rotary(device)

    def sources(self) -> list[nn.Parameter]:
        """The policy's parameters the replica copies (to gather before ``refresh``)."""
        return [p for name in SAMPLING_MODULES for p in getattr(self._policy, name).parameters()]

    def holds(self, version) -> bool:
        """Whether the copy already holds the weights of optimiser step ``version`` (never
        for None: a caller that does not know the step always copies)."""
        return version is not None and version == self.version

    def reuse(self) -> None:
        """Mark the copy fresh without copying: the policy's weights have not changed since
        the last ``refresh`` (micro-steps of one optimiser step)."""
        self.fresh = True

    @torch.no_grad()
    def refresh(self, version=None) -> None:
        """Copy the policy's current sampling weights and buffers in, in place (the first
        time, the replica takes their device and dtype: DeepSpeed moves and casts the
        policy after the replica was made), and record ``version`` (the optimiser step they
        are from). Call with the parameters whole: under
        ``deepspeed.zero.GatheredParameters(self.sources())`` at ZeRO-3."""
        for name in SAMPLING_MODULES:
            source, target = getattr(self._policy, name), getattr(self, name)
            for kind in ("named_parameters", "named_buffers"):
                targets = dict(getattr(target, kind)())
                for key, value in getattr(source, kind)():
                    mine = targets.get(key)
                    if mine is None:
                        raise RuntimeError(f"sampling replica: {name}.{key} is not in the copy "
                                           "made at construction (modules changed since)")
                    if mine.shape != value.shape:
                        raise RuntimeError(
                            f"sampling replica: {name}.{key} is {tuple(value.shape)} in the "
                            f"policy, {tuple(mine.shape)} in the copy (refresh with the "
                            "parameters gathered)")
                    if mine.device != value.device or mine.dtype != value.dtype:
                        mine.data = torch.empty_like(value)
                    mine.copy_(value)
        self.refreshes += 1
        self.version = version
        self.fresh = True

    def take(self) -> SamplingReplica:
        """The replica, to sample from once: an error unless it was refreshed since the
        last time (it would hold an earlier step's weights, or none on this device)."""
        if not self.fresh:
            raise RuntimeError("the ZeRO-3 sampling replica was not refreshed since it was "
                               "last sampled from: call SRDRLModule.refresh_sampling_replica() "
                               "before each forward pass (srdrl.engine.train_step does)")
        self.fresh = False
        return self
