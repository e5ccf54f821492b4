"""Which AdamW steps the parameters under DeepSpeed (``--optimizer``).

``deepspeed_adamw`` (the default): DeepSpeed builds the optimiser from the config's
``optimizer`` block; with ``"torch_adam": true`` (the built-in config) that is
``torch.optim.AdamW`` in its default (foreach) form.

``torch_fused_adamw``: srdrl builds ``torch.optim.AdamW(fused=True)`` (one fused kernel per
step on CUDA; torch has a fused CPU kernel too) with the lr, betas, eps and weight_decay of
the same block, and hands it to ``deepspeed.initialize`` as a client optimiser. ZeRO wraps
it as it wraps its own: ``torch.optim.AdamW`` is on DeepSpeed's list of ZeRO-supported
optimisers (``deepspeed.runtime.zero.utils.is_zero_supported_optimizer``), so no
``zero_allow_untested_optimizer`` is needed; gradient clipping, bf16 master weights,
partitioning, the LR schedule passed to ``deepspeed.initialize`` and checkpoints are
DeepSpeed's in both cases.

A block that asks for something else (another optimiser type, Adam with L2 decay instead of
decoupled, parameters AdamW does not take) or ZeRO's optimiser offload (which wants
DeepSpeed's CPU Adam) is refused with the file named.
"""

from __future__ import annotations

from pathlib import Path

import torch

from srdrl.config import OPTIMIZERS
from srdrl.errors import ConfigError

DEFAULT_OPTIMIZER = OPTIMIZERS[0]
ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
"""What the client AdamW takes from the config block; missing ones keep torch's defaults,
as they do when DeepSpeed builds torch's AdamW itself."""
NOT_FOR_THE_CLIENT = ("torch_adam", "adam_w_mode")
"""Keys that choose DeepSpeed's implementation or mode; checked, not passed on."""


def client_adamw_settings(ds_config: dict, path: Path | str) -> dict:
    """The AdamW keyword arguments in ``ds_config``'s optimizer block, for
    ``torch_fused_adamw``; ConfigError naming ``path`` when the block or ZeRO's settings
    ask for something a client AdamW is not."""
    block = ds_config.get("optimizer", {})
    kind = str(block.get("type", "AdamW"))
    params = dict(block.get("params", {}))
    if kind.lower() not in ("adam", "adamw"):
        raise ConfigError(f"{path}: optimizer.type = {kind!r} conflicts with --optimizer "
                          "torch_fused_adamw; remove the optimizer block, make it AdamW, or "
                          "use --optimizer deepspeed_adamw")
    if params.get("adam_w_mode", True) is not True:
        raise ConfigError(f"{path}: optimizer.params.adam_w_mode = {params['adam_w_mode']!r} "
                          "asks for Adam with L2 decay; --optimizer torch_fused_adamw is AdamW "
                          "(decoupled decay): remove adam_w_mode or use --optimizer "
                          "deepspeed_adamw")
    unknown = sorted(set(params) - set(ADAMW_KEYS) - set(NOT_FOR_THE_CLIENT))
    if unknown:
        raise ConfigError(f"{path}: optimizer.params {', '.join(unknown)} not used by "
                          f"--optimizer torch_fused_adamw (it takes {', '.join(ADAMW_KEYS)}); "
                          "remove them or use --optimizer deepspeed_adamw")
    if ds_config.get("zero_optimization", {}).get("offload_optimizer") is not None:
        raise ConfigError(f"{path}: zero_optimization.offload_optimizer needs DeepSpeed's CPU "
                          "Adam; use --optimizer deepspeed_adamw with optimizer offload")
    settings = {k: params[k] for k in ADAMW_KEYS if k in params}
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    return settings


def fused_adamw_factory(settings: dict):
    """A callable DeepSpeed gives the parameters to (after moving the module to its
    device), returning the fused AdamW."""
    def build(params) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, fused=True, **settings)
    return build
