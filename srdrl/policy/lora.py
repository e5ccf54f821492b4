"""LoRA adapters on the VLM and the action expert, through ``peft``.

``apply_lora(policy, settings)`` injects peft LoRA layers in place into ``policy.vlm`` and
``policy.expert`` (``peft.inject_adapter_in_model``: the modules keep their paths, so
``policy.vlm.model.language_model`` and the encode/expert code work unchanged) and decides
what trains: the adapters, ``action_in_proj`` and ``action_out_proj``; a part set to
``full`` trains whole, one set to ``frozen`` not at all. The consistency heads live outside
the policy (``srdrl.objective.ConsistencyHeads``) and are left as they are (trained). The
vision tower stays frozen unless ``lora_vision_tower`` asks for adapters or full training.

A LoRA layer computes ``base(x) + (alpha / r) * B(A(dropout(x)))`` with B initialised to
zero, so a freshly adapted policy computes exactly what the base policy did.

On disk (``save_lora_adapters``): one folder per adapted part, ``<dir>/vlm/`` and
``<dir>/expert/``, each an ``adapter_model.safetensors`` and ``adapter_config.json`` in
peft's own format (tensor names as ``PeftModel.save_pretrained`` writes them), so
``peft.PeftModel.from_pretrained(Qwen3VLForConditionalGeneration(...), "<dir>/vlm")`` reads
the VLM's adapters. ``merged_state_dict`` gives the policy's weights with the adapters folded
in under the plain parameter names (what ``VLAPolicy.from_pretrained`` loads); ``merge_lora``
does the same in place and removes the LoRA layers, for the final export.

Only peft API present since 0.13 is used (the GPU machine's peft is older than this one's):
``LoraConfig``, ``inject_adapter_in_model(config, module, adapter_name)``,
``get_peft_model_state_dict``, ``set_peft_model_state_dict``, and the LoRA layer's
``get_delta_weight``/``merge``/``get_base_layer``. Under ZeRO-3 the parameters are partitioned:
call the state-dict and merge functions inside ``deepspeed.zero.GatheredParameters``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from srdrl.errors import ConfigError

ADAPTER = "default"
"""The peft adapter name used for every part."""
PARTS = ("vlm", "expert")
"""Attributes of ``VLAPolicy`` that can carry adapters."""
FULL, FROZEN = "full", "frozen"
VISION_PREFIX = "model.visual."
"""Where the VLM's vision tower (blocks, merger, DeepStack mergers) sits in ``policy.vlm``."""
VISION_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")
"""The linear layers of a vision block, adapted when ``lora_vision_tower`` is "lora"."""
PEFT_PREFIX = "base_model.model."
"""Prefix of tensor names in a peft adapter file (the path inside a ``PeftModel``)."""
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


@dataclass
class LoraSettings:
    """LoRA fine-tuning: which layers get adapters, their size, and what else trains."""

    use_peft: bool = False
    """Train LoRA adapters (through peft) instead of every weight; the action projections
    and the consistency heads still train whole."""
    lora_r: int = 8
    """Rank of each adapter (A: in -> r, B: r -> out)."""
    lora_alpha: int = 16
    """Adapter scale numerator: the update is (lora_alpha / lora_r) * B A x."""
    lora_dropout: float = 0.05
    """Dropout on an adapter's input while training (0 turns it off)."""
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """Comma-separated names (last parts of module paths) of the linear layers that get
    adapters, in the VLM's text decoder and in the expert, unless set per part below."""
    lora_targets_vlm: str | None = None
    """Override for the VLM's text decoder: names as in lora_target_modules, or 'full'
    (no adapters, every text weight trains) or 'frozen' (no adapters, nothing trains).
    Empty: lora_target_modules."""
    lora_targets_expert: str | None = None
    """Override for the action expert, as lora_targets_vlm. Empty: lora_target_modules."""
    lora_vision_tower: str = FROZEN
    """The VLM's vision tower: 'frozen', 'lora' (adapters on each block's qkv, proj,
    linear_fc1, linear_fc2) or 'full'."""

    def __post_init__(self):
        if self.lora_r < 1:
            raise ConfigError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_vision_tower not in (FROZEN, "lora", FULL):
            raise ConfigError(f"lora_vision_tower must be 'frozen', 'lora' or 'full', got "
                              f"{self.lora_vision_tower!r}")
        for name in ("lora_targets_vlm", "lora_targets_expert"):
            if getattr(self, name) == "":
                setattr(self, name, None)
        for name in ("lora_target_modules", "lora_targets_vlm", "lora_targets_expert"):
            value = getattr(self, name)
            if value is not None and value not in (FULL, FROZEN):
                _split_names(value, name)

    def target_field(self, part: str) -> str:
        """The field that decides ``part`` ("vlm" or "expert"): its override, if set."""
        field = f"lora_targets_{part}"
        return field if getattr(self, field) is not None else "lora_target_modules"

    def targets(self, part: str) -> tuple[str, ...] | str:
        """The module names to adapt in ``part``, or FULL / FROZEN."""
        field = self.target_field(part)
        value = getattr(self, field)
        return value if value in (FULL, FROZEN) else _split_names(value, field)


def _split_names(value: str, field: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    bad = [n for n in names if not _NAME.fullmatch(n)]
    if not names or bad:
        raise ConfigError(f"{field}: expected comma-separated module names such as "
                          f"'q_proj,v_proj', or 'full' / 'frozen'; got {value!r}")
    return names


def _suffix_regex(names) -> str:
    """Module paths ending in one of ``names`` (whole path components)."""
    return r"(?:.*\.)?(?:" + "|".join(re.escape(n) for n in names) + ")"


def _check_names_exist(module: nn.Module, names, skip_prefix: str | None, field: str) -> None:
    paths = [n for n, _ in module.named_modules()
             if n and (skip_prefix is None or not n.startswith(skip_prefix))]
    for name in names:
        if not any(p == name or p.endswith("." + name) for p in paths):
            linear = sorted({p.rsplit(".", 1)[-1] for p, m in module.named_modules()
                             if isinstance(m, nn.Linear)
                             and (skip_prefix is None or not p.startswith(skip_prefix))})
            raise ConfigError(f"{field}: {name!r} names no module of this part; its linear "
                              f"layers are called {linear}")


def _inject(module: nn.Module, target_regex: str, settings: LoraSettings) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                        lora_dropout=settings.lora_dropout, target_modules=target_regex,
                        bias="none")
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)


def apply_lora(policy: nn.Module, settings: LoraSettings) -> dict[str, int] | None:
    """Inject the adapters ``settings`` asks for and set ``requires_grad`` on every parameter
    of ``policy`` (see the module docstring). Returns parameter counts (trainable, adapter,
    total) for the log, or None when ``settings.use_peft`` is off (nothing changes)."""
    if not settings.use_peft:
        return None
    if getattr(policy, "lora_settings", None) is not None:
        raise RuntimeError("apply_lora: this policy already has LoRA adapters")
    vlm_targets, expert_targets = settings.targets("vlm"), settings.targets("expert")
    patterns = []
    if vlm_targets not in (FULL, FROZEN):
        _check_names_exist(policy.vlm, vlm_targets, VISION_PREFIX, settings.target_field("vlm"))
        patterns.append(r"(?!" + re.escape(VISION_PREFIX) + ")" + _suffix_regex(vlm_targets))
    if settings.lora_vision_tower == "lora":
        patterns.append(re.escape(VISION_PREFIX) + r"blocks\.\d+\."
                        + "(?:" + "|".join(re.escape(n) for n in VISION_LORA_TARGETS) + ")")
    if patterns:
        _inject(policy.vlm, "|".join(f"(?:{p})" for p in patterns), settings)
    if expert_targets not in (FULL, FROZEN):
        _check_names_exist(policy.expert, expert_targets, None, settings.target_field("expert"))
        _inject(policy.expert, _suffix_regex(expert_targets), settings)

    for name, p in policy.named_parameters():
        p.requires_grad_(".lora_" in name)  # peft's adapter tensors: lora_A, lora_B
    trainable = [policy.action_in_proj, policy.action_out_proj]
    if vlm_targets == FULL:
        trainable += [m for n, m in policy.vlm.named_children() if n != "model"]  # lm_head
        trainable += [m for n, m in policy.vlm.model.named_children() if n != "visual"]
    if settings.lora_vision_tower == FULL:
        trainable.append(policy.vlm.model.visual)
    if expert_targets == FULL:
        trainable.append(policy.expert)
    for module in trainable:
        module.requires_grad_(True)
    policy.lora_settings = settings
    return {
        "trainable": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "adapter": sum(p.numel() for n, p in policy.named_parameters() if ".lora_" in n),
        "total": sum(p.numel() for p in policy.parameters()),
    }


def _lora_layers(module: nn.Module):
    """(path, layer) of every peft LoRA layer inside ``module``."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def adapted_parts(policy: nn.Module) -> list[str]:
    """The parts of ``policy`` ("vlm", "expert") that carry LoRA adapters."""
    return [part for part in PARTS if hasattr(getattr(policy, part), "peft_config")]


def lora_state_dict(policy: nn.Module, part: str) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``policy.<part>`` as CPU copies, named as in a peft adapter
    file (``base_model.model.<path>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    module = getattr(policy, part)
    state = get_peft_model_state_dict(module, adapter_name=ADAPTER, save_embedding_layers=False)
    return {PEFT_PREFIX + k: v.detach().to("cpu", copy=True).contiguous()
            for k, v in state.items()}


def save_lora_adapters(policy: nn.Module, directory: str | Path) -> list[Path]:
    """Write each adapted part's adapters to ``directory/<part>/`` in peft's format; returns
    the folders written."""
    from safetensors.torch import save_file

    written = []
    for part in adapted_parts(policy):
        folder = Path(directory) / part
        folder.mkdir(parents=True, exist_ok=True)
        save_file(lora_state_dict(policy, part), str(folder / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        getattr(policy, part).peft_config[ADAPTER].save_pretrained(str(folder))
        written.append(folder)
    return written


def load_lora_adapters(policy: nn.Module, directory: str | Path) -> None:
    """Load adapters written by ``save_lora_adapters`` into a policy that ``apply_lora``
    prepared with the same settings; every adapter tensor must be present."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for part in adapted_parts(policy):
        path = Path(directory) / part / ADAPTER_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no adapters for policy.{part}")
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(path)).items()}
        expected = set(lora_state_dict(policy, part))
        found = {PEFT_PREFIX + k for k in state}
        if found != expected:
            raise ValueError(f"{path}: adapter tensors do not match policy.{part}: missing "
                             f"{sorted(expected - found)[:5]}, unexpected "
                             f"{sorted(found - expected)[:5]}")
        set_peft_model_state_dict(getattr(policy, part), state, adapter_name=ADAPTER)


def merged_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights with every LoRA update folded in, under the plain names a policy
    without adapters has (``...q_proj.weight``); the policy itself is not changed."""
    layers = {f"{part}.{n}": m for part in PARTS for n, m in _lora_layers(getattr(policy, part))}
    state = {}
    for key, value in policy.state_dict().items():
        if ".lora_" in key:
            continue
        owner, _, leaf = key.rpartition(".")
        if owner.endswith(".base_layer") and owner[:-len(".base_layer")] in layers:
            owner = owner[:-len(".base_layer")]
            layer = layers[owner]
            if (leaf == "weight" and ADAPTER in layer.lora_A and not layer.merged
                    and not layer.disable_adapters):
                delta = layer.get_delta_weight(ADAPTER)  # (out, in)
                value = (value.float() + delta.float()).to(value.dtype)
        state[f"{owner}.{leaf}"] = value
    return state


def merge_lora(policy: nn.Module) -> None:
    """Fold the adapters into the base weights in place and put the plain layers back, so
    the policy saves and loads as one without LoRA."""
    for part in adapted_parts(policy):
        module = getattr(policy, part)
        for path, layer in _lora_layers(module):
            if not layer.merged:
                layer.merge(adapter_names=[ADAPTER])
            parent_path, _, child = path.rpartition(".")
            parent = module.get_submodule(parent_path) if parent_path else module
            setattr(parent, child, layer.get_base_layer())
        del module.peft_config
    policy.lora_settings = None
