"""The Alpamayo-R1 release layout: its ``config.json`` mapped to a ``PolicyConfig`` and back.

A release folder holds ``config.json`` (``model_type`` 'alpamayo_r1') and sharded
safetensors with an index. Tensor names: ``vlm.*`` (the Qwen3-VL with the trajectory tokens
in its vocabulary), ``expert.*`` (the transformers text decoder built from the VLM's text
config with ``expert_cfg`` written over it, without ``embed_tokens``), ``action_in_proj.*``
(``PerWaypointActionInProjV2``), ``action_out_proj.*`` (a Linear to 2) and the action
space's normalisation constants ``action_space.*``. srdrl's modules carry the same names, so
the load is strict by name; the constants are checked against ``action_space_cfg``, and the
Fourier frequency buffers may be absent (srdrl computes the same values). The release's
encoder always starts at frequency 1; srdrl's may start lower (its small presets do), which
no release config field can say: the saved ``freqs`` buffers carry it (the release's module
loads them over its own), and srdrl reads the lowest frequency back from them.

The config does not contain the VLM's config or tokenizer: the release reads them from
``vlm_name_or_path`` (a hub name) and adds ``<i0>`` .. ``<i{traj_vocab_size-1}>`` and the
trajectory markers to the tokenizer. srdrl takes them, in this order, from ``vlm_path``
(a local Qwen3-VL folder), from the ``vlm_config`` entry srdrl writes into exported folders,
from ``vlm_name_or_path`` when it is a local folder, or from the local Hugging Face cache
(never the network); the tokenizer and preprocessor_config.json from the folder itself when
present (exports and the release's converted training folders have them), else from the
VLM's folder.

Fields srdrl has no use for (trajectory tokenizers, dtype, attention implementation) are
kept and written back unchanged; fields that would change the computation and that srdrl
cannot follow are errors.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import Qwen3VLConfig

from srdrl.policy.formats import (
    CONFIG_JSON,
    PASSTHROUGH,
    PREPROCESSOR,
    CheckpointError,
    expert_from_text,
    image_fields,
    load_strict,
    policy_config,
    preprocessor_values,
    read_json,
    read_tensors,
    state_for_saving,
    write_json,
    write_tensors,
)
from srdrl.policy.model import VLAPolicy
from srdrl.policy.tokenizer import (
    TRAJ_TOKENS,
    add_trajectory_tokens,
    load_tokenizer,
    save_tokenizer,
    token_id,
)

TARGETS = {
    "action_in_proj_cfg": "alpamayo_r1.models.action_in_proj.PerWaypointActionInProjV2",
    "action_out_proj_cfg": "torch.nn.Linear",
    "diffusion_cfg": "alpamayo_r1.diffusion.flow_matching.FlowMatching",
    "action_space_cfg":
        "alpamayo_r1.action_space.unicycle_accel_curvature.UnicycleAccelCurvatureActionSpace",
}
"""The class each sub-config instantiates (``_target_``), as the release's source names them."""
ACTION_IN_DEFAULTS = {"num_enc_layers": 4, "hidden_size": 1024, "max_freq": 100.0,
                      "num_fourier_feats": 20}
"""``PerWaypointActionInProjV2``'s defaults."""
STATISTICS = ("accel_mean", "accel_std", "curvature_mean", "curvature_std")
EXPERT_FIELDS = {"hidden_size": "expert_hidden_size",
                 "intermediate_size": "expert_intermediate_size",
                 "num_attention_heads": "expert_num_attention_heads"}
EXPERT_IGNORED = ("vocab_size", "use_cache", "dtype", "torch_dtype", "attn_implementation",
                  "_attn_implementation", "initializer_range")
"""``expert_cfg`` keys without effect on srdrl's expert (it has no embedding table)."""


def _sub_config(cfg: dict, key: str, where: str) -> dict:
    sub = dict(cfg.get(key) or {})
    target = sub.pop("_target_", TARGETS[key])
    if target.rsplit(".", 1)[-1] != TARGETS[key].rsplit(".", 1)[-1]:
        raise CheckpointError(f"{where}: {key}._target_ {target!r} is not supported; srdrl "
                              f"implements {TARGETS[key].rsplit('.', 1)[-1]}")
    return sub


def _expert_fields(cfg: dict, vlm_config: Qwen3VLConfig, where: str) -> dict:
    """The expert's ``PolicyConfig`` fields: the text config's sizes with ``expert_cfg``."""
    fields = expert_from_text(vlm_config)
    text = vlm_config.text_config
    for key, value in (cfg.get("expert_cfg") or {}).items():
        if key in EXPERT_FIELDS:
            fields[EXPERT_FIELDS[key]] = value
        elif key not in EXPERT_IGNORED and getattr(text, key, object()) != value:
            raise CheckpointError(
                f"{where}: expert_cfg.{key}={value!r} differs from the VLM text config's "
                f"{getattr(text, key, None)!r}; srdrl's expert shares layers, KV heads, head_dim "
                "and RoPE with the VLM and can only change hidden_size, intermediate_size and "
                "num_attention_heads")
    return fields


def _action_fields(cfg: dict, where: str) -> dict:
    """Action projections, flow matching and action space from the release's sub-configs."""
    if not cfg.get("expert_non_causal_attention", True):
        raise CheckpointError(f"{where}: expert_non_causal_attention is false; srdrl's action "
                              "tokens always attend to each other both ways")
    proj = {**ACTION_IN_DEFAULTS, **_sub_config(cfg, "action_in_proj_cfg", where)}
    out = _sub_config(cfg, "action_out_proj_cfg", where)
    diffusion = _sub_config(cfg, "diffusion_cfg", where)
    space = _sub_config(cfg, "action_space_cfg", where)
    problems = [f"{key}.{name}={value!r}" for key, name, value, ok in (
        ("action_in_proj_cfg", "num_fourier_feats", proj["num_fourier_feats"],
         proj["num_fourier_feats"] % 2 == 0),
        ("action_out_proj_cfg", "bias", out.get("bias", True), out.get("bias", True)),
        ("diffusion_cfg", "int_method", diffusion.get("int_method", "euler"),
         diffusion.get("int_method", "euler") == "euler"),
        ("action_space_cfg", "dt", space.get("dt", 0.1), abs(space.get("dt", 0.1) - 0.1) < 1e-9),
        ("action_space_cfg", "n_waypoints", space.get("n_waypoints", 64),
         space.get("n_waypoints", 64) == 64),
    ) if not ok]
    unknown = sorted(set(proj) - set(ACTION_IN_DEFAULTS) - {"in_dims", "out_dim"})
    problems += [f"action_in_proj_cfg.{k}" for k in unknown]
    if problems:
        raise CheckpointError(f"{where}: srdrl cannot follow {problems} (it implements 2 "
                              "Fourier features per frequency, a biased action_out_proj, Euler "
                              "steps, and 64 actions at 0.1 s)")
    # the release's action space defaults to mean 0, std 1 when the statistics are absent
    stats = [float(space.get(name, 1.0 if name.endswith("std") else 0.0)) for name in STATISTICS]
    return dict(
        action_encoder="fourier_v2", action_in_num_layers=proj["num_enc_layers"],
        action_in_hidden_size=proj["hidden_size"],
        fourier_frequencies=proj["num_fourier_feats"] // 2, fourier_min_frequency=1.0,
        fourier_max_frequency=float(proj["max_freq"]),
        flow_time_distribution=diffusion.get("train_timestep_sampler", "beta"),
        action_mean=(stats[0], stats[2]), action_std=(stats[1], stats[3]),
        traj_vocab_size=cfg.get("traj_vocab_size", 768),
    )


def _vlm_source(path: Path, cfg: dict, vlm_path) -> tuple[Qwen3VLConfig, Path | None]:
    """The VLM's config and, when there is one, the local folder it came from."""
    where = path / CONFIG_JSON
    if vlm_path is None and cfg.get("vlm_config"):
        return Qwen3VLConfig.from_dict(cfg["vlm_config"]), None
    if vlm_path is not None:
        source = Path(vlm_path)
    elif cfg.get("vlm_name_or_path") and Path(cfg["vlm_name_or_path"]).is_dir():
        source = Path(cfg["vlm_name_or_path"])
    elif cfg.get("vlm_name_or_path"):
        from huggingface_hub import snapshot_download

        try:
            source = Path(snapshot_download(cfg["vlm_name_or_path"], local_files_only=True))
        except Exception:  # any failure means: not in the local cache
            raise CheckpointError(
                f"{where}: vlm_name_or_path {cfg['vlm_name_or_path']!r} is neither a local "
                "folder nor in the local Hugging Face cache, and srdrl downloads nothing; pass "
                "vlm_path= a local Qwen3-VL folder (config.json, tokenizer, "
                "preprocessor_config.json)") from None
    else:
        raise CheckpointError(f"{where}: no vlm_name_or_path or vlm_config; pass vlm_path= a "
                              "local Qwen3-VL folder")
    vlm_cfg = read_json(source / CONFIG_JSON)
    if vlm_cfg.get("model_type") != "qwen3_vl":
        raise CheckpointError(f"{source / CONFIG_JSON}: model_type {vlm_cfg.get('model_type')!r}"
                              ", expected 'qwen3_vl'")
    return Qwen3VLConfig.from_dict(vlm_cfg), source


def load_alpamayo(path: Path, vlm_path, overrides: dict) -> VLAPolicy:
    where = str(path / CONFIG_JSON)
    cfg = read_json(path / CONFIG_JSON)
    vlm_config, source = _vlm_source(path, cfg, vlm_path)
    if (path / "tokenizer.json").is_file():  # saved already extended
        tokenizer = load_tokenizer(path)
    elif source is not None:
        tokenizer = load_tokenizer(source)
        add_trajectory_tokens(tokenizer, cfg.get("traj_vocab_size", 768),
                              cfg.get("add_special_tokens", False))
        if cfg.get("vocab_size", len(tokenizer)) != len(tokenizer):
            raise CheckpointError(f"{where}: vocab_size {cfg['vocab_size']}, but {source}'s "
                                  f"tokenizer with the trajectory tokens has {len(tokenizer)}")
    else:
        raise CheckpointError(f"{path}: no tokenizer.json, and no VLM folder to take one from")
    pre_file = path / PREPROCESSOR
    if not pre_file.is_file() and source is not None:
        pre_file = source / PREPROCESSOR
    preprocessor = read_json(pre_file)
    vlm_config.text_config.vocab_size = cfg.get("vocab_size") or len(tokenizer)

    from srdrl.policy.config import vlm_fields

    values = {**vlm_fields(vlm_config), **_expert_fields(cfg, vlm_config, where),
              **image_fields(preprocessor, str(pre_file)), **_action_fields(cfg, where)}
    if cfg.get("min_pixels"):
        values["image_min_pixels"] = cfg["min_pixels"]
    if cfg.get("max_pixels"):
        values["image_max_pixels"] = cfg["max_pixels"]
    tensors = read_tensors(path)
    saved = tensors.get("action_in_proj.timestep_fourier_encoder.freqs")
    if saved is not None:  # the frequencies the weights were trained with decide
        values["fourier_min_frequency"] = float(saved.flatten()[0])
    policy = VLAPolicy(policy_config(values, overrides, where), tokenizer, vlm_config=vlm_config)

    for name, value in zip(STATISTICS, _statistics(policy), strict=True):
        saved = tensors.pop(f"action_space.{name}", None)
        tolerance = 2 * torch.finfo(saved.dtype).eps * abs(value) if saved is not None else 0
        if saved is not None and abs(saved.double().item() - value) > tolerance:
            raise CheckpointError(f"{path}: tensor action_space.{name} = {saved.item()} differs "
                                  f"from action_space_cfg.{name} = {value}")
    frequencies = frozenset(n for n in policy.state_dict() if n.endswith(".freqs"))
    load_strict(policy, tensors, str(path), optional=frequencies)
    policy.layout_info = {"config": cfg, "preprocessor": preprocessor, "files": {
        name: (path / name).read_text() for name in PASSTHROUGH if (path / name).is_file()}}
    return policy


def _statistics(policy: VLAPolicy) -> tuple[float, float, float, float]:
    (accel_mean, curvature_mean), (accel_std, curvature_std) = (policy.config.action_mean,
                                                                policy.config.action_std)
    return accel_mean, accel_std, curvature_mean, curvature_std


def release_config(policy: VLAPolicy) -> dict:
    """config.json of the release layout for ``policy``: the loaded folder's entries (if it
    came from one) with everything srdrl determines written over them."""
    config, tokenizer = policy.config, policy.tokenizer
    if config.action_encoder != "fourier_v2":
        raise CheckpointError("the legacy action encoder has no Alpamayo-R1 equivalent; export "
                              "this policy in srdrl's own layout")
    cfg = copy.deepcopy(policy.layout_info.get("config") or {})
    discrete = 0
    while token_id(tokenizer, f"<i{discrete}>") is not None:
        discrete += 1
    text = policy.vlm.config.text_config
    expert = {"hidden_size": config.expert_hidden_size,
              "intermediate_size": config.expert_intermediate_size,
              "num_attention_heads": config.expert_num_attention_heads}
    cfg.update(
        model_type="alpamayo_r1", architectures=["AlpamayoR1"],
        vlm_name_or_path=cfg.get("vlm_name_or_path", policy.layout_info.get("vlm_source")),
        vocab_size=text.vocab_size, traj_vocab_size=discrete,
        traj_token_start_idx=token_id(tokenizer, "<i0>"),
        traj_token_ids={t.strip("<|>").removeprefix("traj_"): token_id(tokenizer, t)
                        for t in TRAJ_TOKENS},
        min_pixels=config.image_min_pixels, max_pixels=config.image_max_pixels,
        expert_cfg={**(cfg.get("expert_cfg") or {}), **expert},
        expert_non_causal_attention=True, vlm_config=policy.vlm.config.to_dict(),
    )
    cfg.setdefault("vlm_backend", "qwenvl3")
    cfg.setdefault("keep_same_dtype", True)
    sub = {key: {"_target_": TARGETS[key], **(cfg.get(key) or {})} for key in TARGETS}
    sub["action_in_proj_cfg"].update(
        num_enc_layers=config.action_in_num_layers, hidden_size=config.action_in_width,
        max_freq=config.fourier_max_frequency, num_fourier_feats=2 * config.fourier_frequencies)
    sub["diffusion_cfg"]["train_timestep_sampler"] = config.flow_time_distribution
    sub["action_space_cfg"].update(dict(zip(STATISTICS, _statistics(policy), strict=True)),
                                   dt=0.1, n_waypoints=64)
    cfg.update(sub)
    return cfg


def save_alpamayo(policy: VLAPolicy, directory: Path, max_shard_size: int | str) -> None:
    cfg = release_config(policy)
    for name, text in policy.layout_info.get("files", {}).items():
        (directory / name).write_text(text)
    tensors = state_for_saving(policy)
    for name, value in zip(STATISTICS, _statistics(policy), strict=True):
        tensors[f"action_space.{name}"] = torch.tensor(value, dtype=torch.float32)
    write_tensors(tensors, directory, max_shard_size)
    save_tokenizer(policy.tokenizer, directory)
    write_json(directory / PREPROCESSOR,
               preprocessor_values(policy.config, policy.layout_info.get("preprocessor")))
    write_json(directory / CONFIG_JSON, cfg)
