"""Regional ``torch.compile`` of the policy (``--compile_layers``).

Modules are compiled one by one (``nn.Module.compile``: a module keeps its parameters and
names, so checkpoints and LoRA are unchanged); modules of one class share their code, so one
compilation serves every layer and the first step pays for a handful of graphs, not one per
layer. Inductor fuses what runs between the matmuls (RMSNorm, rotary, SwiGLU, residual adds,
casts) forward and backward; matmuls and attention stay on cuBLAS and PyTorch's SDPA.

- The action expert: each layer whole (it is a pure function of tensors, no cache).
- The VLM text decoder: each layer's MLP and its input and post-attention RMSNorms, not
  the layer whole (nor the attention's q/k norms, whose 4-d inputs would be graphs of their
  own): the layer writes its keys/values into transformers' DynamicCache,
  whose per-layer state Dynamo guards on, so a whole layer would compile once per layer
  index and run past Dynamo's recompile limit.

What is not compiled: the vision blocks, the projections, the objective and scoring.
Reasoning generation inside a training step runs eagerly (``eager_layers``): its decode
step sees a new cache length on every token.

The CUDA-graph sampler captures the compiled expert layers after its warm-up has compiled
them for the sampling shapes. ZeRO-3 is refused: its hooks gather parameters submodule by
submodule around forward calls, which Dynamo would have to trace through. So is
``--liger_kernels``, whose kernels would sit inside the compiled modules (not tried).
"""

from __future__ import annotations

import torch

from srdrl.errors import ConfigError

COMPILE_BACKENDS = ("inductor", "aot_eager")


class CompileLayersError(ConfigError):
    """--compile_layers cannot be applied here."""


def check_compile_layers(zero_stage: int, liger_kernels: bool = False) -> None:
    """A one-line error for what --compile_layers has not been made to work with."""
    if zero_stage == 3:
        raise CompileLayersError("--compile_layers runs at ZeRO stages 0-2; at ZeRO-3 "
                                 "DeepSpeed's parameter hooks run inside each layer's forward")
    if liger_kernels:
        raise CompileLayersError("--compile_layers and --liger_kernels both replace the "
                                 "layers' norms and SwiGLU; choose one")


def compile_policy_layers(policy, backend: str = "inductor") -> dict[str, int]:
    """Compile ``policy``'s (a VLAPolicy's) expert layers and VLM text layers' MLPs and
    RMSNorms in place; returns how many modules of each kind. ``backend``: inductor (fused
    kernels; on CPU it needs a C++ compiler) or aot_eager (traces forward and backward
    without generating code: the tests' check of the tracing on CPU)."""
    if backend not in COMPILE_BACKENDS:
        raise CompileLayersError(f"unknown compile backend {backend!r}; choose from "
                                 f"{list(COMPILE_BACKENDS)}")
    text_layers = policy.vlm.model.language_model.layers
    modules = {
        "expert_layers": list(policy.expert.layers),
        "vlm_mlps": [layer.mlp for layer in text_layers],
        "vlm_rms_norms": [norm for layer in text_layers
                          for norm in (layer.input_layernorm, layer.post_attention_layernorm)],
    }
    for module in (m for group in modules.values() for m in group):
        module.compile(backend=backend)
    return {kind: len(group) for kind, group in modules.items()}


def eager_layers():
    """A context in which compiled layers run their eager code (``torch.compiler``'s
    "force_eager" stance); for token-by-token generation."""
    return torch.compiler.set_stance("force_eager")
