"""Checkpoint layouts: srdrl's own, a Hugging Face Qwen3-VL folder, an Alpamayo-R1 folder.

The Qwen3-VL folder is made by transformers itself (``Qwen3VLForConditionalGeneration`` +
``save_pretrained``, sharded) with a locally trained BPE tokenizer whose Qwen special tokens
sit at the end of the vocabulary. The Alpamayo-R1 folder is written here from the release's
facts alone: ``vlm.*`` from transformers' Qwen3-VL, ``expert.*`` from transformers' own text
decoder built from the text config with ``expert_cfg`` (without ``embed_tokens``), the
action-in projection's names listed from the release's structure, two shards and an index.
Each layout is loaded, trained two steps, exported and reloaded bit for bit. Parity with
the release's modules is in test_release_parity.py.
"""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModel,
    PreTrainedTokenizerFast,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLTextModel,
)

import srdrl  # noqa: F401  (registers the Auto classes)
from srdrl.config import ObjectiveConfig, RewardConfig
from srdrl.data.dataset import JsonlDataset, collate
from srdrl.data.synthetic import SyntheticDataConfig, make_dataset
from srdrl.objective import ConsistencyHeads, srdrl_loss
from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer
from srdrl.policy.formats import CheckpointError, detect_layout
from srdrl.policy.tokenizer import SPECIAL_TOKENS, TRAJ_TOKENS, special_token_ids

sys.path.insert(0, str(Path(__file__).resolve().parent))
from release_source import RELEASE_SRC, release_module  # noqa: E402

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
    "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
TEXTS = ["Mud patch ahead on the left; steer right to pass it.",
         "Clear dirt track ahead; keep straight.", "Rocks block the track, brake and stop.",
         "You drive an off-road vehicle. Where should we drive, and why?"] * 4
TRAJ_VOCAB = 16
"""Discrete trajectory tokens of the tiny Alpamayo-R1 folder (the release uses 768)."""
EXPERT_CFG = {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4}
ACTION_IN = {"num_enc_layers": 2, "hidden_size": 32, "max_freq": 100.0, "num_fourier_feats": 8}


# --------------------------------------------------------------------------- builders


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen's special tokens appended after the merges (ids > 256)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    backend.add_special_tokens(QWEN_SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>")


def qwen_config(tokenizer, rows: int, tied: bool) -> Qwen3VLConfig:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    return Qwen3VLConfig(
        text_config=dict(vocab_size=rows, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0,
                                          "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=64, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tied)


PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "patch_size": 16,
                "temporal_patch_size": 2, "merge_size": 2,
                "size": {"shortest_edge": 4096, "longest_edge": 12288}}


def write_qwen3_vl(folder: Path, tied: bool = True) -> Path:
    """A tiny Qwen3-VL folder written by transformers: sharded weights, tokenizer, processor."""
    tokenizer = qwen_tokenizer()
    torch.manual_seed(1)
    model = Qwen3VLForConditionalGeneration(qwen_config(tokenizer, len(tokenizer) + 7, tied))
    model.save_pretrained(folder, max_shard_size="800KB")
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return folder


def action_in_tensors(out: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``action_in_proj.*`` of ``PerWaypointActionInProjV2`` with ``ACTION_IN``, by the release's
    structure (or, where its source is available, by the release's own module)."""
    if RELEASE_SRC:
        module = release_module("alpamayo_r1.models.action_in_proj").PerWaypointActionInProjV2(
            in_dims=[64, 2], out_dim=out, num_enc_layers=ACTION_IN["num_enc_layers"],
            hidden_size=ACTION_IN["hidden_size"], max_freq=ACTION_IN["max_freq"],
            num_fourier_feats=ACTION_IN["num_fourier_feats"])
        return {f"action_in_proj.{k}": v for k, v in module.state_dict().items()}
    half, hidden = ACTION_IN["num_fourier_feats"] // 2, ACTION_IN["hidden_size"]
    freqs = torch.logspace(0, math.log10(ACTION_IN["max_freq"]), half)[None]
    t = {f"sinus.{i}.freqs": freqs.clone() for i in range(2)}
    t["timestep_fourier_encoder.freqs"] = freqs.clone()
    # trunk: Linear, SiLU, then per layer RMSNorm, Linear (+ SiLU except the last)
    t["encoder.trunk.0.weight"] = torch.randn(hidden, 3 * 2 * half, generator=gen) * 0.1
    t["encoder.trunk.0.bias"] = torch.randn(hidden, generator=gen) * 0.1
    index = 2
    for layer in range(ACTION_IN["num_enc_layers"]):
        width = out if layer == ACTION_IN["num_enc_layers"] - 1 else hidden
        t[f"encoder.trunk.{index}.weight"] = 1 + 0.1 * torch.randn(hidden, generator=gen)
        t[f"encoder.trunk.{index + 1}.weight"] = torch.randn(width, hidden, generator=gen) * 0.1
        t[f"encoder.trunk.{index + 1}.bias"] = torch.randn(width, generator=gen) * 0.1
        index += 3
    t["norm.weight"] = 1 + 0.1 * torch.randn(out, generator=gen)
    t["norm.bias"] = 0.1 * torch.randn(out, generator=gen)
    return {f"action_in_proj.{k}": v for k, v in t.items()}


def write_alpamayo(folder: Path, qwen: Path) -> dict[str, torch.Tensor]:
    """A tiny Alpamayo-R1 release folder (bf16, two shards and an index) whose config points
    at the Qwen3-VL folder ``qwen`` for the VLM config and tokenizer. Its VLM ties lm_head to
    the embeddings as that folder's config says, so the tied copy is stored once, as
    transformers stores it. Returns its tensors."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(qwen))
    tokenizer.add_tokens([f"<i{k}>" for k in range(TRAJ_VOCAB)])
    tokenizer.add_tokens(list(TRAJ_TOKENS), special_tokens=True)
    vocab = len(tokenizer)
    torch.manual_seed(2)
    vlm = Qwen3VLForConditionalGeneration(qwen_config(tokenizer, vocab, tied=True))
    expert_config = copy.deepcopy(vlm.config.text_config)
    for key, value in EXPERT_CFG.items():
        setattr(expert_config, key, value)
    expert = Qwen3VLTextModel(expert_config)
    del expert.embed_tokens
    gen = torch.Generator().manual_seed(3)
    tensors = {**{f"vlm.{k}": v for k, v in vlm.state_dict().items() if k != "lm_head.weight"},
               **{f"expert.{k}": v for k, v in expert.state_dict().items()},
               **action_in_tensors(EXPERT_CFG["hidden_size"], gen),
               "action_out_proj.weight": torch.randn(2, EXPERT_CFG["hidden_size"], generator=gen),
               "action_out_proj.bias": torch.randn(2, generator=gen),
               "action_space.accel_mean": torch.tensor(0.0290), "action_space.accel_std":
               torch.tensor(0.68), "action_space.curvature_mean": torch.tensor(0.00027),
               "action_space.curvature_std": torch.tensor(0.026)}
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    folder.mkdir(parents=True, exist_ok=True)
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    stats = {"accel_mean": 0.0290, "accel_std": 0.68, "curvature_mean": 0.00027,
             "curvature_std": 0.026}
    (folder / "config.json").write_text(json.dumps({
        "model_type": "alpamayo_r1", "architectures": ["AlpamayoR1"],
        "vlm_name_or_path": str(qwen), "vlm_backend": "qwenvl3", "traj_vocab_size": TRAJ_VOCAB,
        "tokens_per_history_traj": 16, "tokens_per_future_traj": 64, "vocab_size": vocab,
        "model_dtype": "bfloat16", "add_special_tokens": False, "expert_cfg": EXPERT_CFG,
        "action_in_proj_cfg": {
            "_target_": "alpamayo_r1.models.action_in_proj.PerWaypointActionInProjV2",
            **ACTION_IN},
        "action_out_proj_cfg": {"_target_": "torch.nn.Linear"},
        "diffusion_cfg": {"_target_": "alpamayo_r1.diffusion.flow_matching.FlowMatching",
                          "num_inference_steps": 10},
        "action_space_cfg": {"_target_": "alpamayo_r1.action_space."
                             "UnicycleAccelCurvatureActionSpace", **stats},
        "keep_same_dtype": True, "expert_non_causal_attention": True}))
    return tensors


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    qwen = write_qwen3_vl(root / "qwen3_vl")
    alpamayo_tensors = write_alpamayo(root / "alpamayo", qwen)
    torch.manual_seed(0)
    config = PolicyConfig.tiny()
    VLAPolicy(config, build_tokenizer(config, TEXTS)).save_pretrained(root / "srdrl")
    return {"qwen3_vl": qwen, "alpamayo_r1": root / "alpamayo", "srdrl": root / "srdrl",
            "alpamayo_tensors": alpamayo_tensors}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats_data")
    make_dataset(SyntheticDataConfig(output_dir=str(root), num_scenes=4, width=128, height=96,
                                     label_noise=0.5, seed=4), progress=False)
    ds = JsonlDataset(root / "train.jsonl")
    return collate([ds[i] for i in range(2)])


def train_two_steps(policy: VLAPolicy, batch) -> None:
    heads = ConsistencyHeads.for_policy(policy)
    params = [*policy.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    cfg = ObjectiveConfig(num_trajectory_samples=2, flow_steps=2, use_cuda_graph=False)
    for step in range(2):
        loss, _ = srdrl_loss(policy, heads, batch, cfg, RewardConfig(),
                             generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()


def assert_same_tensors(a: VLAPolicy, b: VLAPolicy) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, different[:10]


# --------------------------------------------------------------------------- layouts


def test_detect_layout(folders, tmp_path):
    assert detect_layout(folders["srdrl"]) == "srdrl"
    assert detect_layout(folders["qwen3_vl"]) == "qwen3_vl"
    assert detect_layout(folders["alpamayo_r1"]) == "alpamayo_r1"
    with pytest.raises(CheckpointError, match="not a policy checkpoint"):
        detect_layout(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        detect_layout(tmp_path)


@pytest.mark.parametrize("layout", ["srdrl", "qwen3_vl", "alpamayo_r1"])
def test_load_train_export_reload_bit_identical(folders, batch, tmp_path, layout):
    overrides = {"action_in_hidden_size": 32} if layout == "qwen3_vl" else {}
    policy = VLAPolicy.from_pretrained(folders[layout], **overrides)
    assert policy.layout == layout
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    train_two_steps(policy, batch)
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("expert.") for k in changed)
    assert any(k.startswith("vlm.") for k in changed)
    out = policy.save_pretrained(tmp_path / "export", max_shard_size="1MB")
    assert detect_layout(out) == layout
    again = VLAPolicy.from_pretrained(out)
    assert again.layout == layout and again.config == policy.config
    assert_same_tensors(policy, again)
    assert again.tokenizer.get_vocab() == policy.tokenizer.get_vocab()


def test_qwen3_vl_import(folders):
    source = PreTrainedTokenizerFast.from_pretrained(str(folders["qwen3_vl"]))
    policy = VLAPolicy.from_pretrained(folders["qwen3_vl"], expert_hidden_size=40,
                                       expert_num_attention_heads=2)
    tok = policy.tokenizer
    ids = special_token_ids(tok)
    assert min(ids[t] for t in QWEN_SPECIALS if t in SPECIAL_TOKENS) > 256  # not at 0..8
    # the release's additions, in its order, after the source vocabulary
    added = [f"<i{k}>" for k in range(768)] + list(TRAJ_TOKENS)
    assert [tok.convert_tokens_to_ids(t) for t in added] == list(
        range(len(source), len(source) + len(added)))
    rows = policy.vlm.get_input_embeddings().num_embeddings
    assert rows == len(tok) == policy.config.vocab_size
    # the VLM keeps the folder's weights for the tokens it had
    reference = Qwen3VLForConditionalGeneration.from_pretrained(str(folders["qwen3_vl"]))
    old = reference.get_input_embeddings().weight
    assert torch.equal(policy.vlm.get_input_embeddings().weight[: old.shape[0]], old)
    assert policy.vlm.lm_head.weight is policy.vlm.get_input_embeddings().weight  # still tied
    # expert: the text config's layers/KV heads/head_dim, the overrides' width and heads
    cfg, text = policy.config, reference.config.text_config
    assert (cfg.num_layers, cfg.num_key_value_heads, cfg.head_dim) == (2, 2, 16)
    assert (cfg.expert_hidden_size, cfg.expert_num_attention_heads) == (40, 2)
    assert cfg.expert_intermediate_size == text.intermediate_size
    # the release's projections and flow-matching times unless overridden
    assert (cfg.action_in_num_layers, cfg.action_in_width, cfg.fourier_frequencies,
            cfg.flow_time_distribution) == (4, 1024, 10, "beta")
    # image settings from preprocessor_config.json
    assert (cfg.image_min_pixels, cfg.image_max_pixels) == (4096, 12288)
    # the inputs find the special tokens by name: one image block per frame
    inputs = policy.build_inputs(_scene_batch())
    assert (inputs.input_ids == ids["<|vision_start|>"]).sum() == 2
    assert int(inputs.mm_token_type_ids.sum()) == int(
        (inputs.image_grid_thw.prod(-1) // 4).sum())
    # fresh parts are seeded: two imports are equal, another seed differs
    again = VLAPolicy.from_pretrained(folders["qwen3_vl"], expert_hidden_size=40,
                                      expert_num_attention_heads=2)
    assert_same_tensors(policy, again)
    other = VLAPolicy.from_pretrained(folders["qwen3_vl"], expert_hidden_size=40,
                                      expert_num_attention_heads=2, init_seed=1)
    assert not torch.equal(other.expert.norm.weight + other.action_out_proj.weight.sum(),
                           policy.expert.norm.weight + policy.action_out_proj.weight.sum())


def _scene_batch():
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randint(0, 256, (2, 1, 96, 128, 3), dtype=torch.uint8, generator=g),
            "ego_history_xyz": torch.zeros(2, 16, 3),
            "reasoning_text": ["Mud ahead, steer right.", "Keep straight."]}


def test_alpamayo_import_is_strict_by_name(folders):
    policy = VLAPolicy.from_pretrained(folders["alpamayo_r1"])
    cfg = policy.config
    assert (cfg.expert_hidden_size, cfg.expert_intermediate_size,
            cfg.expert_num_attention_heads) == (48, 96, 4)
    assert (cfg.action_in_num_layers, cfg.action_in_width, cfg.fourier_frequencies,
            cfg.fourier_min_frequency, cfg.fourier_max_frequency) == (2, 32, 4, 1.0, 100.0)
    assert cfg.flow_time_distribution == "beta"  # the release's FlowMatching default
    assert cfg.action_mean == (0.0290, 0.00027) and cfg.action_std == (0.68, 0.026)
    state = policy.state_dict()
    for name, tensor in folders["alpamayo_tensors"].items():
        if name.startswith("action_space."):
            continue
        assert torch.equal(state[name], tensor.float()), name  # bf16 -> float32 is exact
    assert len(policy.tokenizer) == cfg.vocab_size
    assert policy.tokenizer.convert_tokens_to_ids(f"<i{TRAJ_VOCAB - 1}>") < cfg.vocab_size


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_strict_load_names_missing_and_unexpected_tensors(folders, tmp_path):
    # Alpamayo-R1: one expert tensor dropped, an embedding table the expert has no place for
    broken = _copy_folder(folders["alpamayo_r1"], tmp_path / "alpamayo")
    shard = broken / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    victim = next(k for k in tensors if k.startswith("expert."))
    del tensors[victim]
    tensors["expert.embed_tokens.weight"] = torch.zeros(3, 48)
    save_file(tensors, str(shard))
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"][victim]
    index["weight_map"]["expert.embed_tokens.weight"] = shard.name
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        VLAPolicy.from_pretrained(broken)
    assert f"missing [{victim}]" in str(e.value)
    assert "unexpected [expert.embed_tokens.weight]" in str(e.value)
    # a tied copy that disagrees with the tensor it is tied to
    tensors = load_file(str(shard))
    del tensors["expert.embed_tokens.weight"]
    tensors[victim] = folders["alpamayo_tensors"][victim]
    embed = folders["alpamayo_tensors"]["vlm.model.language_model.embed_tokens.weight"]
    tensors["vlm.lm_head.weight"] = embed + 1
    save_file(tensors, str(shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                           if k != "expert.embed_tokens.weight"}
    index["weight_map"].update({victim: shard.name, "vlm.lm_head.weight": shard.name})
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="vlm.lm_head.weight differs from vlm.model"):
        VLAPolicy.from_pretrained(broken)
    # an index naming a tensor its shards lack
    index["weight_map"]["vlm.extra"] = shard.name
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"listed only in the index \[vlm.extra\]"):
        VLAPolicy.from_pretrained(broken)
    # srdrl's own layout: a wrong shape is named with both shapes
    own = _copy_folder(folders["srdrl"], tmp_path / "own")
    tensors = load_file(str(own / "model.safetensors"))
    tensors["action_out_proj.bias"] = torch.zeros(3)
    save_file(tensors, str(own / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"action_out_proj.bias \(3,\) \(expected \(2,\)\)"):
        VLAPolicy.from_pretrained(own)
    # a Qwen3-VL folder whose weights lack a tensor its config needs
    qwen = _copy_folder(folders["qwen3_vl"], tmp_path / "qwen")
    index = json.loads((qwen / "model.safetensors.index.json").read_text())
    victim = "model.language_model.layers.1.mlp.up_proj.weight"
    shard = qwen / index["weight_map"][victim]
    tensors = load_file(str(shard))
    del tensors[victim]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    del index["weight_map"][victim]
    (qwen / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="layers.1.mlp.up_proj.weight"):
        VLAPolicy.from_pretrained(qwen)


def test_cross_layout_export(folders, tmp_path):
    """A Qwen3-VL import written as an Alpamayo-R1 folder reads back equal."""
    policy = VLAPolicy.from_pretrained(folders["qwen3_vl"], action_in_hidden_size=24,
                                       fourier_frequencies=3)
    out = policy.save_pretrained(tmp_path / "as_alpamayo", layout="alpamayo_r1")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "alpamayo_r1" and cfg["traj_vocab_size"] == 768
    assert cfg["action_in_proj_cfg"]["num_fourier_feats"] == 6
    assert cfg["vlm_name_or_path"] == str(folders["qwen3_vl"].resolve())
    again = VLAPolicy.from_pretrained(out)
    assert again.layout == "alpamayo_r1" and again.config == policy.config
    assert_same_tensors(policy, again)


def test_old_checkpoint_with_only_policy_config_json(tmp_path):
    """srdrl's earlier layout: policy_config.json without the fields added since, and the
    first action encoder's tensors."""
    torch.manual_seed(0)
    config = PolicyConfig.tiny(action_encoder="legacy")
    policy = VLAPolicy(config, build_tokenizer(config, TEXTS))
    policy.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    new_fields = {"action_encoder", "action_in_num_layers", "action_in_hidden_size",
                  "fourier_min_frequency", "fourier_max_frequency", "flow_time_distribution",
                  "action_mean", "action_std", "traj_vocab_size", "image_mean", "image_std"}
    old = {k: v for k, v in config.to_dict().items() if k not in new_fields}
    (tmp_path / "policy_config.json").write_text(json.dumps(old))
    loaded = VLAPolicy.from_pretrained(tmp_path)
    assert loaded.config == config and "waypoint_embedding" in dict(
        loaded.action_in_proj.named_parameters())
    assert_same_tensors(policy, loaded)


def test_auto_classes_and_push_to_hub(folders, monkeypatch, tmp_path):
    config = AutoConfig.from_pretrained(folders["srdrl"])
    assert config.model_type == "srdrl_vla"
    assert config.to_policy_config() == PolicyConfig.tiny()
    model = AutoModel.from_pretrained(folders["srdrl"])
    assert isinstance(model, VLAPolicy)
    assert_same_tensors(model, VLAPolicy.from_pretrained(folders["srdrl"]))

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            return f"https://hub.example/{repo_id}/commit/1"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = model.push_to_hub("me/policy", private=True, token="t")
    assert url.endswith("me/policy/commit/1")
    assert calls["repo"] == ("me/policy", True, True) and calls["token"] == "t"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(calls["files"])
