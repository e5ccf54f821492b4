"""Liger-Kernel's fused Triton kernels on the policy (``--liger_kernels``).

What changes, all forward and backward, numerically the unfused path within bf16 rounding
(tests/test_fused_kernels.py, on CUDA):

- the VLM (transformers' Qwen3-VL) through Liger's own ``apply_liger_kernel_to_qwen3_vl``:
  RMSNorm of every text layer (input, post-attention, q/k norms, final) and rotary
  embedding. Liger replaces the rotary function of transformers' Qwen3-VL module, so it
  holds for every Qwen3-VL model in the process from then on;
- SwiGLU (``silu(gate) * up``) in the VLM's text MLPs and the action expert's MLPs, as one
  Liger kernel (Liger's Qwen3-VL patch leaves the MLP alone);
- the action expert's RMSNorms, with Liger's RMSNorm kernel in the "llama" casting mode
  (normalise in float32, cast, then scale), as Qwen3's RMSNorm does.

The language loss keeps its own cross-entropy: it already computes logits only at the
labelled reasoning tokens (policy/model.py), and it needs the per-token losses that Liger's
fused linear cross-entropy does not return per scene. Liger's kernels are Triton kernels
for GPUs; Triton's CPU interpreter cannot run them, so the flag needs CUDA.
"""

from __future__ import annotations

import types

import torch

from srdrl.errors import ConfigError


class FusedKernelsError(ConfigError):
    """--liger_kernels cannot be applied here (no CUDA, or Liger-Kernel missing)."""


def check_liger_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise FusedKernelsError(f"--liger_kernels needs a CUDA device (this run is on "
                                f"{device.type}): Liger's Triton kernels do not run on CPU")


def _liger():
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl
    except ImportError as e:  # pragma: no cover - liger-kernel is a dependency
        raise FusedKernelsError(f"--liger_kernels needs liger-kernel ({e}); "
                                "pip install liger-kernel") from e
    return apply_liger_kernel_to_qwen3_vl, LigerRMSNormFunction, LigerSiLUMulFunction


def _swiglu_forward(mul):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(mul.apply(self.gate_proj(x), self.up_proj(x)))
    return forward


def _rms_norm_forward(function):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x, weight, eps, offset, casting_mode, in_place)
        return function.apply(x, self.weight, self.eps, 0.0, "llama", False)
    return forward


LIGER_KERNELS = ("rms_norm", "rope", "swiglu")


def apply_liger_kernels(policy, kernels=LIGER_KERNELS) -> dict[str, int]:
    """Put Liger's kernels on ``policy`` (a VLAPolicy) in place; returns how many modules
    of each kind now run on them. ``kernels`` picks a subset of ``LIGER_KERNELS`` (the
    flag uses all; the benchmark times them apart). The policy must be on its CUDA
    device; call it before DeepSpeed wraps the model."""
    unknown = set(kernels) - set(LIGER_KERNELS)
    if unknown:
        raise FusedKernelsError(f"unknown Liger kernels {sorted(unknown)}; "
                                f"choose from {list(LIGER_KERNELS)}")
    check_liger_device(policy.device)
    apply_qwen3_vl, rms_norm, silu_mul = _liger()
    from srdrl.policy.expert import ExpertMLP, RMSNorm

    apply_qwen3_vl(rope="rope" in kernels, rms_norm="rms_norm" in kernels, swiglu=False,
                   cross_entropy=False, fused_linear_cross_entropy=False, model=policy.vlm)
    counts = {"vlm_text_layers": len(policy.vlm.model.language_model.layers)
              if {"rope", "rms_norm"} & set(kernels) else 0,
              "swiglu": 0, "expert_rms_norm": 0}
    swiglu, norm = _swiglu_forward(silu_mul), _rms_norm_forward(rms_norm)
    mlps = [layer.mlp for layer in policy.vlm.model.language_model.layers]
    mlps += [m for m in policy.expert.modules() if isinstance(m, ExpertMLP)]
    if "swiglu" in kernels:
        for mlp in mlps:
            mlp.forward = types.MethodType(swiglu, mlp)
            counts["swiglu"] += 1
    if "rms_norm" in kernels:
        for module in policy.expert.modules():
            if isinstance(module, RMSNorm):
                module.forward = types.MethodType(norm, module)
                counts["expert_rms_norm"] += 1
    return counts
