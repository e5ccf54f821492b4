"""Policy checkpoints in three layouts, read from and written to local folders only.

``detect_layout`` decides from the folder's ``config.json`` ``model_type``:

- 'srdrl_vla' (or no config.json but a ``policy_config.json``, as srdrl wrote before):
  srdrl's own layout. ``config.json`` (``hub.SRDRLConfig``: the ``PolicyConfig`` fields and
  the VLM's ``Qwen3VLConfig``), ``model.safetensors`` (or shards and an index) with every
  tensor of the policy, the tokenizer.
- 'qwen3_vl': a Hugging Face Qwen3-VL folder (config.json, tokenizer, preprocessor_config.json,
  single or sharded safetensors). The VLM loads through transformers; the tokenizer gains the
  release's trajectory tokens and the embeddings grow to fit them; the expert is built from
  the text config as the release builds its expert (its sizes, unless ``expert_*``
  overrides say otherwise) and starts fresh with the action projections, which take the
  release's sizes and flow-matching times (``RELEASE_ACTION_FIELDS``) unless overridden.
  srdrl writes this layout back as the same Qwen3-VL folder plus ``action_expert.json``
  (the ``PolicyConfig``) and ``action_expert.safetensors`` (expert and projections), which
  it reads back in turn.
- 'alpamayo_r1': an Alpamayo-R1 release folder; see ``alpamayo.py``.

Every load is strict: a tensor the policy needs and the folder lacks, one the folder holds
and the policy has no place for, or one of the wrong shape is an error that names them.
Fresh parts (a Qwen3-VL import's expert, projections and new embedding rows) are drawn under
``init_seed`` without touching the caller's random state, so every rank builds the same.
``save_policy`` writes a layout; ``VLAPolicy.save_pretrained`` defaults to the one loaded.
"""

from __future__ import annotations

import dataclasses
import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from srdrl.errors import UserError
from srdrl.policy.config import RELEASE_ACTION_FIELDS, PolicyConfig, vlm_fields
from srdrl.policy.model import VLAPolicy
from srdrl.policy.tokenizer import add_trajectory_tokens, load_tokenizer, save_tokenizer

SRDRL, QWEN3_VL, ALPAMAYO_R1 = "srdrl", "qwen3_vl", "alpamayo_r1"
LAYOUTS = (SRDRL, QWEN3_VL, ALPAMAYO_R1)
MODEL_TYPES = {"srdrl_vla": SRDRL, "qwen3_vl": QWEN3_VL, "alpamayo_r1": ALPAMAYO_R1}
CONFIG_JSON = "config.json"
LEGACY_CONFIG = "policy_config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PREPROCESSOR = "preprocessor_config.json"
EXPERT_CONFIG = "action_expert.json"
EXPERT_WEIGHTS = "action_expert.safetensors"
PASSTHROUGH = ("chat_template.json", "chat_template.jinja", "video_preprocessor_config.json")
"""Small files of a Qwen3-VL folder srdrl does not use but writes back unchanged."""
ACTION_PARTS = ("expert.", "action_in_proj.", "action_out_proj.")
IMAGE_PROCESSOR_FIXED = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
                         "do_normalize": True, "do_convert_rgb": True}
"""Image-processor settings srdrl's input pipeline always applies (inputs.py)."""


class CheckpointError(UserError, ValueError):
    """A folder that is not a checkpoint srdrl can read, or whose tensors do not fit."""


# ----------------------------------------------------------------------------- files


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2, sort_keys=False) + "\n")


def detect_layout(path: str | Path) -> str:
    """'srdrl', 'qwen3_vl' or 'alpamayo_r1' for a local checkpoint folder; an error otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder (srdrl reads checkpoints from local "
                              "disk only)")
    if (path / CONFIG_JSON).is_file():
        model_type = read_json(path / CONFIG_JSON).get("model_type")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(f"{path / CONFIG_JSON}: model_type {model_type!r} is not one "
                                  f"srdrl reads ({', '.join(MODEL_TYPES)})")
        return MODEL_TYPES[model_type]
    if (path / LEGACY_CONFIG).is_file():
        return SRDRL
    raise CheckpointError(f"{path} is not a policy checkpoint (no {CONFIG_JSON} or "
                          f"{LEGACY_CONFIG})")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's ``model.safetensors``, or of the shards its index lists."""
    if (path / INDEX).is_file():
        weight_map = read_json(path / INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path / INDEX}: no weight_map")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{path / INDEX} names {shard}, which {path} lacks")
            tensors.update(load_file(str(path / shard)))
        listed, found = set(weight_map), set(tensors)
        if listed != found:
            raise CheckpointError(
                f"{path / INDEX} and its shards disagree: listed only in the index "
                f"{name_list(listed - found)}; only in the shards {name_list(found - listed)}")
        return tensors
    if (path / WEIGHTS).is_file():
        return load_file(str(path / WEIGHTS))
    raise CheckpointError(f"{path}: no {WEIGHTS} or {INDEX}")


def write_tensors(tensors: dict[str, torch.Tensor], directory: Path,
                  max_shard_size: int | str) -> None:
    """``model.safetensors``, or shards and an index beyond ``max_shard_size``; weight files
    of an earlier save in ``directory`` are removed first (a mix would not load)."""
    for old in directory.glob("model*.safetensors*"):
        if old.name in (WEIGHTS, INDEX) or re.fullmatch(r"model-\d+-of-\d+\.safetensors",
                                                        old.name):
            old.unlink()
    save_torch_state_dict(tensors, directory, max_shard_size=max_shard_size)


# ----------------------------------------------------------------------------- tensors


def name_list(names, limit: int = 12) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return "[" + ", ".join(names[:limit]) + "]" + more


def alias_names(module: torch.nn.Module) -> dict[str, str]:
    """Second and later names of tied tensors (e.g. an lm_head tied to the embeddings) ->
    the first name; checkpoints store such a tensor once."""
    first, aliases = {}, {}
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def state_for_saving(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Fresh contiguous CPU copies of the state dict, tied duplicates dropped: parameters
    may be views into a larger flat buffer (DeepSpeed ZeRO-1/2), which safetensors refuses
    to save as they are."""
    aliases = alias_names(module)
    return {prefix + name: t.detach().to("cpu", copy=True).contiguous()
            for name, t in module.state_dict().items() if name not in aliases}


def load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str,
                optional: frozenset[str] = frozenset()) -> None:
    """Load ``tensors`` into ``module`` by name; any missing (other than ``optional``),
    unexpected or misshapen tensor is an error naming them all."""
    expected = module.state_dict()
    aliases = alias_names(module)
    missing = set(expected) - set(aliases) - set(tensors) - optional
    unexpected = set(tensors) - set(expected)
    shapes = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
              for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
    for alias, name in aliases.items():
        if alias in tensors and name in tensors and not torch.equal(tensors[alias],
                                                                    tensors[name]):
            shapes.append(f"{alias} differs from {name}, to which it is tied")
    if missing or unexpected or shapes:
        parts = [f"missing {name_list(missing)}" if missing else "",
                 f"unexpected {name_list(unexpected)}" if unexpected else "",
                 f"wrong {', '.join(shapes[:12])}" if shapes else ""]
        raise CheckpointError(f"{where}: the tensors do not fit the policy: "
                              + "; ".join(p for p in parts if p))
    module.load_state_dict({k: v for k, v in tensors.items() if k not in aliases},
                           strict=False)


# ----------------------------------------------------------------------------- configs


def policy_config(values: dict, overrides: dict, where: str) -> PolicyConfig:
    """``PolicyConfig`` from ``values`` then ``overrides``; unknown names are errors."""
    known = {f.name for f in dataclasses.fields(PolicyConfig)}
    unknown = sorted(set(values) - known) + sorted(set(overrides) - known)
    if unknown:
        raise CheckpointError(f"{where}: unknown PolicyConfig fields {unknown}")
    try:
        return PolicyConfig(**{**values, **overrides})
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def expert_from_text(vlm_config: Qwen3VLConfig) -> dict:
    """The expert's sizes when built, as the release does, from a copy of the text config."""
    text = vlm_config.text_config
    if text.attention_bias or text.hidden_act != "silu":
        raise CheckpointError(f"the VLM's text config has attention_bias={text.attention_bias}, "
                              f"hidden_act={text.hidden_act!r}; srdrl's expert has neither "
                              "biases nor another activation than silu")
    return dict(expert_hidden_size=text.hidden_size,
                expert_intermediate_size=text.intermediate_size,
                expert_num_attention_heads=text.num_attention_heads)


def image_fields(pre: dict, where: str) -> dict:
    """PolicyConfig image fields from a preprocessor_config.json's values."""
    wrong = {k: pre[k] for k, v in IMAGE_PROCESSOR_FIXED.items()
             if k in pre and pre[k] != v and not (isinstance(v, float) and
                                                  abs(pre[k] - v) < 1e-9)}
    if wrong:
        raise CheckpointError(f"{where}: srdrl's inputs always use {IMAGE_PROCESSOR_FIXED}; "
                              f"this processor sets {wrong}")
    size = pre.get("size") or {}
    values = dict(
        patch_size=pre.get("patch_size"), temporal_patch_size=pre.get("temporal_patch_size"),
        spatial_merge_size=pre.get("merge_size"),
        image_min_pixels=size.get("shortest_edge", pre.get("min_pixels")),
        image_max_pixels=size.get("longest_edge", pre.get("max_pixels")),
        image_mean=pre.get("image_mean"), image_std=pre.get("image_std"))
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise CheckpointError(f"{where}: lacks the image-processor settings for {missing}")
    return values


def preprocessor_values(config: PolicyConfig, original: dict | None) -> dict:
    """preprocessor_config.json for ``config``: the original file's entries with srdrl's
    image fields written over them."""
    values = dict(original or {"image_processor_type": "Qwen2VLImageProcessor",
                               "processor_class": "Qwen3VLProcessor",
                               **IMAGE_PROCESSOR_FIXED})
    values.update(patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
                  merge_size=config.spatial_merge_size, image_mean=list(config.image_mean),
                  image_std=list(config.image_std),
                  size={"shortest_edge": config.image_min_pixels,
                        "longest_edge": config.image_max_pixels})
    values.pop("min_pixels", None)
    values.pop("max_pixels", None)
    return values


@contextmanager
def seeded_rng(seed: int):
    """The CPU generator seeded with ``seed`` inside, the caller's state restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- load / save


def load_policy(path: str | Path, vlm_path: str | Path | None = None, init_seed: int = 0,
                **overrides) -> VLAPolicy:
    """Load a policy from a local folder in any of the three layouts. ``overrides`` are
    ``PolicyConfig`` fields (e.g. ``expert_hidden_size`` for a Qwen3-VL import, or
    ``stop_gradient_to_vlm``); ``vlm_path``: a local Qwen3-VL folder supplying the VLM config,
    tokenizer and processor an Alpamayo-R1 folder refers to; ``init_seed``: seeds the fresh
    parts of an import."""
    path = Path(path)
    layout = detect_layout(path)
    with seeded_rng(init_seed):
        try:
            if layout == SRDRL:
                policy = _load_srdrl(path, overrides)
            elif layout == QWEN3_VL:
                policy = _load_qwen3_vl(path, overrides)
            else:
                from srdrl.policy.alpamayo import load_alpamayo

                policy = load_alpamayo(path, vlm_path, overrides)
        except CheckpointError:
            raise
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    policy.layout = layout
    return policy


def save_policy(policy: VLAPolicy, directory: str | Path, layout: str,
                max_shard_size: int | str = "5GB") -> Path:
    """Write ``policy`` to ``directory`` in ``layout``; returns the directory."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if layout == SRDRL:
        from srdrl.policy.hub import SRDRLConfig

        SRDRLConfig.from_policy(policy.config, policy.vlm.config.to_dict()).to_json_file(
            directory / CONFIG_JSON, use_diff=False)
        write_tensors(state_for_saving(policy), directory, max_shard_size)
        save_tokenizer(policy.tokenizer, directory)
    elif layout == QWEN3_VL:
        _save_qwen3_vl(policy, directory, max_shard_size)
    else:
        from srdrl.policy.alpamayo import save_alpamayo

        save_alpamayo(policy, directory, max_shard_size)
    return directory


def _load_srdrl(path: Path, overrides: dict) -> VLAPolicy:
    vlm_config = None
    if (path / CONFIG_JSON).is_file():
        values = read_json(path / CONFIG_JSON)
        vlm_values = values.pop("vlm_config", None)
        vlm_config = Qwen3VLConfig.from_dict(vlm_values) if vlm_values else None
        known = {f.name for f in dataclasses.fields(PolicyConfig)}
        values = {k: v for k, v in values.items() if k in known}  # the rest is HF's
        where = str(path / CONFIG_JSON)
    else:  # written before config.json, by the first encoder
        values = {"action_encoder": "legacy", **read_json(path / LEGACY_CONFIG)}
        where = str(path / LEGACY_CONFIG)
    config = policy_config(values, overrides, where)
    policy = VLAPolicy(config, load_tokenizer(path), vlm_config=vlm_config)
    load_strict(policy, read_tensors(path), str(path))
    return policy


def _load_qwen3_vl(path: Path, overrides: dict) -> VLAPolicy:
    saved = read_json(path / EXPERT_CONFIG) if (path / EXPERT_CONFIG).is_file() else {}
    preprocessor = read_json(path / PREPROCESSOR)
    images = image_fields(preprocessor, str(path / PREPROCESSOR))
    vlm, info = Qwen3VLForConditionalGeneration.from_pretrained(
        str(path), local_files_only=True, dtype=torch.float32, output_loading_info=True)
    problems = [f"{kind} {name_list(str(n) for n in names)}" for kind, names in info.items()
                if names]
    if problems:
        raise CheckpointError(f"{path}: the Qwen3-VL weights do not fit its config: "
                              + "; ".join(problems))
    values = {**RELEASE_ACTION_FIELDS, **expert_from_text(vlm.config), **saved, **images}
    tokenizer = load_tokenizer(path)
    add_trajectory_tokens(tokenizer, overrides.get("traj_vocab_size",
                                                   values.get("traj_vocab_size", 768)))
    rows = vlm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # as the release: exactly the tokenizer's length, new rows
        vlm.resize_token_embeddings(len(tokenizer))  # drawn around the old ones' mean
    values.update(vlm_fields(vlm.config))
    config = policy_config(values, overrides, str(path))
    policy = VLAPolicy(config, tokenizer, vlm=vlm)
    if (path / EXPERT_WEIGHTS).is_file():
        load_strict(action_modules(policy), load_file(str(path / EXPERT_WEIGHTS)),
                    str(path / EXPERT_WEIGHTS))
    policy.layout_info = {"preprocessor": preprocessor, "vlm_source": str(path.resolve()),
                          "files": {name: (path / name).read_text() for name in PASSTHROUGH
                                    if (path / name).is_file()}}
    return policy


def _save_qwen3_vl(policy: VLAPolicy, directory: Path, max_shard_size: int | str) -> None:
    files = policy.layout_info.get("files", {})
    for name, text in files.items():
        (directory / name).write_text(text)
    for old in directory.glob("model*.safetensors*"):
        old.unlink()
    policy.vlm.save_pretrained(directory, state_dict=state_for_saving(policy.vlm),
                               max_shard_size=max_shard_size)
    save_tokenizer(policy.tokenizer, directory)
    write_json(directory / PREPROCESSOR,
               preprocessor_values(policy.config, policy.layout_info.get("preprocessor")))
    write_json(directory / EXPERT_CONFIG, policy.config.to_dict())
    save_file(state_for_saving(action_modules(policy)), str(directory / EXPERT_WEIGHTS))


def action_modules(policy: VLAPolicy) -> torch.nn.Module:
    """The policy without its VLM (expert and projections, same names), sharing parameters."""
    module = torch.nn.Module()
    for name in ACTION_PARTS:
        module.add_module(name.rstrip("."), getattr(policy, name.rstrip(".")))
    return module
