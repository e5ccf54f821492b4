"""LoRA through peft, gradient checkpointing of the VLM, and the real-size benchmark's smoke
mode. The DeepSpeed runs and the benchmark run in subprocesses (each makes its own process
group); the CUDA-graph test is marked ``gpu``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from srdrl.errors import ConfigError
from srdrl.policy import (
    Denoiser,
    PolicyConfig,
    VLAPolicy,
    build_tokenizer,
    initial_noise,
    kv_recompute,
    sample_trajectories,
)
from srdrl.policy.kv_recompute import set_vlm_gradient_checkpointing
from srdrl.policy.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraSettings,
    apply_lora,
    load_lora_adapters,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    save_lora_adapters,
)
from srdrl.policy.sampler import _param_pointers

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
from test_policy import REASONING, make_batch  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def new_policy(seed=0, **lora) -> VLAPolicy:
    torch.manual_seed(seed)
    config = PolicyConfig.tiny()
    policy = VLAPolicy(config, build_tokenizer(config, REASONING))
    if lora:
        apply_lora(policy, LoraSettings(use_peft=True, **lora))
    return policy


def randomise_adapters(policy, seed=1, std=0.05):
    """lora_B starts at zero (the adapted policy equals the base one); give it values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def lora_size(fan: list[tuple[int, int]], r: int) -> int:
    return sum(r * (i + o) for i, o in fan)


def projection_fans(hidden, heads, kv, dim, inter):
    """(in, out) of q, k, v, o, gate, up, down in one Qwen3 decoder layer."""
    return [(hidden, heads * dim), (hidden, kv * dim), (hidden, kv * dim), (heads * dim, hidden),
            (hidden, inter), (hidden, inter), (inter, hidden)]


def outputs(policy, batch, seed=3):
    """Language loss, prefix keys and a velocity: what the VLM and the expert compute."""
    with torch.no_grad():
        prefix = policy.encode_prefix(batch)
        x = torch.randn(3, 64, 2, generator=torch.Generator().manual_seed(seed))
        v = policy.velocity(x, torch.full((3,), 0.3), policy.expert_context(prefix))
    return prefix.language_loss, torch.stack([k.float() for k in prefix.keys]), v


# --------------------------------------------------------------------------- settings


def test_settings_reject_bad_values_by_field():
    for kwargs, field in [({"lora_r": 0}, "lora_r"), ({"lora_alpha": 0}, "lora_alpha"),
                          ({"lora_dropout": 1.0}, "lora_dropout"),
                          ({"lora_vision_tower": "some"}, "lora_vision_tower"),
                          ({"lora_target_modules": "q_proj,v proj"}, "lora_target_modules"),
                          ({"lora_targets_expert": "q-proj"}, "lora_targets_expert")]:
        with pytest.raises(ConfigError, match=field):
            LoraSettings(use_peft=True, **kwargs)
    s = LoraSettings(lora_targets_vlm="", lora_targets_expert="full")
    assert s.targets("vlm") == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj")
    assert s.targets("expert") == "full"
    with pytest.raises(ConfigError, match="lora_targets_vlm: 'qkv_proj' names no module"):
        new_policy(lora_targets_vlm="q_proj,qkv_proj")


def test_off_changes_nothing():
    policy = new_policy()
    assert apply_lora(policy, LoraSettings(use_peft=False)) is None
    assert all(p.requires_grad for p in policy.parameters())


# --------------------------------------------------------------------------- what trains


def test_default_adapters_and_trainable_set():
    policy = new_policy(lora_r=4)
    c = policy.config
    vlm = projection_fans(c.text_hidden_size, c.num_attention_heads, c.num_key_value_heads,
                          c.head_dim, c.text_intermediate_size)
    expert = projection_fans(c.expert_hidden_size, c.expert_num_attention_heads,
                             c.num_key_value_heads, c.head_dim, c.expert_intermediate_size)
    expected = c.num_layers * (lora_size(vlm, 4) + lora_size(expert, 4))
    adapters = {n: p for n, p in policy.named_parameters() if ".lora_" in n}
    assert sum(p.numel() for p in adapters.values()) == expected
    assert not any(n.startswith("vlm.model.visual.") for n in adapters)
    assert all(p.requires_grad for p in adapters.values())
    whole = ("action_in_proj.", "action_out_proj.")
    for name, p in policy.named_parameters():
        if ".lora_" not in name:
            assert p.requires_grad == name.startswith(whole), name


@pytest.mark.parametrize("vlm,expert,vision", [
    ("full", "frozen", "frozen"), ("frozen", "q_proj,v_proj", "lora"), ("o_proj", "full", "full")])
def test_part_modes(vlm, expert, vision):
    policy = new_policy(lora_targets_vlm=vlm, lora_targets_expert=expert,
                        lora_vision_tower=vision)
    named = dict(policy.named_parameters())

    def trains(prefix, adapters):
        return {p.requires_grad for n, p in named.items()
                if n.startswith(prefix) and (".lora_" in n) == adapters}

    text = "vlm.model.language_model."
    assert trains(text, False) == {vlm == "full"}
    assert trains("vlm.lm_head", False) == {vlm == "full"}
    assert trains(text, True) == ({True} if vlm not in ("full", "frozen") else set())
    assert trains("vlm.model.visual.", False) == {vision == "full"}
    assert trains("vlm.model.visual.", True) == ({True} if vision == "lora" else set())
    assert trains("expert.", False) == {expert == "full"}
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in named
               if n.startswith("expert.") and ".lora_" in n}
    assert adapted == (set(expert.split(",")) if expert not in ("full", "frozen") else set())
    if vision == "lora":
        blocks = {n.split(".lora_")[0].split("blocks.0.")[-1] for n in named
                  if n.startswith("vlm.model.visual.blocks.0.") and ".lora_" in n}
        assert blocks == {"attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"}


def test_lora_layer_computes_base_plus_scaled_low_rank_update():
    policy = new_policy(lora_r=4, lora_alpha=12, lora_dropout=0.0)
    randomise_adapters(policy)
    layer = policy.expert.layers[1].mlp.down_proj
    x = torch.randn(5, layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    expected = x @ layer.base_layer.weight.T + (12 / 4) * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_fresh_adapters_leave_the_policy_unchanged():
    batch = make_batch(3)
    base = outputs(new_policy().eval(), batch)
    adapted = outputs(new_policy(lora_dropout=0.05).eval(), batch)
    for x, y in zip(base, adapted, strict=True):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- merge and save


def test_merged_weights_load_into_a_plain_policy_and_give_the_same_outputs():
    batch = make_batch(3)
    policy = new_policy(lora_vision_tower="lora").eval()
    randomise_adapters(policy)
    reference = outputs(policy, batch)
    assert not torch.equal(reference[2], outputs(new_policy().eval(), batch)[2])
    plain = new_policy(seed=7).eval()
    plain.load_state_dict(merged_state_dict(policy), strict=True)
    for x, y in zip(reference, outputs(plain, batch), strict=True):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-5)
    merge_lora(policy)
    assert type(policy.expert.layers[0].self_attn.q_proj) is nn.Linear
    assert list(policy.state_dict()) == list(plain.state_dict())
    for x, y in zip(reference, outputs(policy, batch), strict=True):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-5)


def test_adapters_are_saved_in_peft_format_and_peft_reads_them(tmp_path):
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    from srdrl.policy.expert import ActionExpert
    from srdrl.policy.tokenizer import special_token_ids

    policy = new_policy(lora_r=8)
    randomise_adapters(policy)
    folders = save_lora_adapters(policy, tmp_path)
    assert [f.name for f in folders] == ["vlm", "expert"]
    assert all((f / ADAPTER_WEIGHTS).is_file() and (f / ADAPTER_CONFIG).is_file()
               for f in folders)
    c = policy.config
    fresh_vlm = Qwen3VLForConditionalGeneration(c.vlm_config(special_token_ids(policy.tokenizer)))
    fresh_expert = ActionExpert(c.num_layers, c.expert_hidden_size, c.expert_intermediate_size,
                                c.expert_num_attention_heads, c.num_key_value_heads, c.head_dim,
                                c.rms_norm_eps)
    for part, fresh in (("vlm", fresh_vlm), ("expert", fresh_expert)):
        loaded = PeftModel.from_pretrained(fresh, str(tmp_path / part))
        theirs = {n: p for n, p in loaded.named_parameters() if ".lora_" in n}
        ours = lora_state_dict(policy, part)
        assert len(theirs) == len(ours) > 0
        for name, p in theirs.items():
            assert torch.equal(p.detach(), ours[name.replace(".default", "")]), name
    again = new_policy(seed=5, lora_r=8)
    load_lora_adapters(again, tmp_path)
    for part in ("vlm", "expert"):
        assert all(torch.equal(v, lora_state_dict(again, part)[k])
                   for k, v in lora_state_dict(policy, part).items())


# --------------------------------------------------------------------------- sampler


def test_eager_sampling_sees_adapter_updates():
    batch = make_batch(2)
    policy = new_policy(lora_r=8).eval()
    before, _ = sample_trajectories(policy, batch, 3, steps=3, use_cuda_graph=False,
                                    generator=torch.Generator().manual_seed(0))
    randomise_adapters(policy)  # in place, as an optimiser does
    after, _ = sample_trajectories(policy, batch, 3, steps=3, use_cuda_graph=False,
                                   generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(before, after, atol=1e-3)
    plain = new_policy(seed=9).eval()
    plain.load_state_dict(merged_state_dict(policy))
    reference, _ = sample_trajectories(plain, batch, 3, steps=3, use_cuda_graph=False,
                                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(after, reference, atol=1e-4, rtol=1e-4)


def test_graph_key_covers_adapter_weights_and_switches():
    policy = new_policy(lora_r=8).eval()
    pointers, _ = key = _param_pointers(policy)
    adapters = {p.data_ptr() for n, p in policy.expert.named_parameters() if ".lora_" in n}
    assert adapters and adapters <= {ptr for ptr, _ in pointers}
    layer = policy.expert.layers[0].self_attn.v_proj
    randomise_adapters(policy)
    assert _param_pointers(policy) == key  # in-place updates: the graph stays valid
    layer.merge()  # base weight changes in place and the forward skips the adapter
    assert _param_pointers(policy) != key
    layer.unmerge()
    assert _param_pointers(policy) == key
    policy.train()
    assert _param_pointers(policy) != key  # dropout is recorded only in training mode


@pytest.mark.gpu
@gpu
def test_graph_replay_sees_adapter_updates():
    policy = new_policy(lora_r=8).cuda().eval()
    batch = make_batch(2)
    denoiser = Denoiser()
    with torch.no_grad():
        prefix = policy.encode_prefix(batch)
    x0 = initial_noise(2, 3, 64, 0.2, torch.Generator().manual_seed(0), "cuda")
    before = denoiser.denoise(policy, prefix, x0, steps=5)
    with torch.no_grad():
        lora_b = policy.expert.layers[1].mlp.up_proj.lora_B["default"].weight
        lora_b.normal_(std=0.2)  # in place: same pointer
    replayed = denoiser.denoise(policy, prefix, x0, steps=5)
    eager = denoiser.denoise(policy, prefix, x0, steps=5, use_cuda_graph=False)
    assert denoiser.captures == 1
    assert not torch.allclose(before, replayed, atol=1e-3)
    torch.testing.assert_close(replayed, eager, atol=1e-5, rtol=1e-5)
    policy.expert.layers[1].mlp.up_proj.merge()  # pointers unchanged, computation not
    merged = denoiser.denoise(policy, prefix, x0, steps=5)
    assert denoiser.captures == 2
    torch.testing.assert_close(merged, eager, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointed_vlm_gives_the_cache_keys_values_loss_and_gradients(lora):
    policy = new_policy(**({"lora_dropout": 0.0} if lora else {})).train()
    randomise_adapters(policy)
    batch = make_batch(3, frames=2)  # DeepStack features enter after layer 0
    target = torch.randn(3, 64, 2, generator=torch.Generator().manual_seed(1))

    def step():
        policy.zero_grad()
        prefix = policy.encode_prefix(batch)
        loss = prefix.language_loss + policy.flow_matching_loss(
            prefix, target, generator=torch.Generator().manual_seed(2))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return prefix, loss.detach(), grads

    cached = step()
    set_vlm_gradient_checkpointing(policy)
    assert kv_recompute.checkpointing_drops_cache(policy.vlm)
    recomputed = step()
    for a, b in zip(cached[0].keys + cached[0].values, recomputed[0].keys + recomputed[0].values,
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cached[1], recomputed[1], atol=1e-6, rtol=1e-6)
    assert cached[2].keys() == recomputed[2].keys()
    assert any(".k_proj." in n for n in cached[2])  # the expert's loss reaches the VLM's keys
    for name, g in cached[2].items():
        torch.testing.assert_close(recomputed[2][name], g, atol=1e-5, rtol=1e-4, msg=name)
    set_vlm_gradient_checkpointing(policy, False)
    assert not kv_recompute.checkpointing_drops_cache(policy.vlm)


# --------------------------------------------------------------------------- DeepSpeed


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TRITON_INTERPRET="1")
    return env


def _engine_run(stage: int, checkpointing: bool) -> None:
    """(In a subprocess) two SRD-RL steps of a LoRA policy under DeepSpeed at ``stage``;
    prints how far each kind of parameter moved."""
    import deepspeed

    from srdrl.config import ObjectiveConfig, RewardConfig
    from srdrl.engine import SRDRLModule, init_distributed, train_step
    from srdrl.policy.noise import SceneNoise

    init_distributed()
    policy = new_policy(lora_r=8)
    if checkpointing:
        set_vlm_gradient_checkpointing(policy)
    module = SRDRLModule(policy, ObjectiveConfig(num_trajectory_samples=2, flow_steps=2),
                         RewardConfig(scoring_backend="kornia"), zero_stage=stage)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "train_batch_size": 2, "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=ds)
    batch = make_batch(2)
    for step in range(2):
        train_step(engine, batch, SceneNoise([2 * step, 2 * step + 1]))
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        moved = {n: (p.detach().float() - before[n].float()).abs().max().item()
                 for n, p in params.items()}
    print("RESULT " + json.dumps({"moved": moved,
                                  "trains": {n: p.requires_grad for n, p in params.items()}}))


@pytest.mark.slow
@pytest.mark.parametrize("stage,checkpointing", [(2, False), (3, False), (2, True), (3, True)],
                         ids=["zero2", "zero3", "zero2-checkpointing", "zero3-checkpointing"])
def test_deepspeed_trains_adapters_and_leaves_base_weights(stage, checkpointing):
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_lora; "
            f"test_lora._engine_run({stage}, {checkpointing})")
    run = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    moved, trains = result["moved"], result["trains"]
    frozen = [n for n, t in trains.items() if not t]
    assert frozen and all(moved[n] == 0.0 for n in frozen), [n for n in frozen if moved[n]]
    lora_b = [n for n in moved if ".lora_B." in n]  # start at exactly zero: moved = got a gradient
    assert len(lora_b) == 14 * 2 and all(moved[n] > 0 for n in lora_b)
    for n in ("policy.action_out_proj.weight", "heads.vision.weight"):
        assert trains[n] and moved[n] > 0


# --------------------------------------------------------------------------- benchmark


def test_full_finetune_memory_matches_the_zero_paper():
    """Rajbhandari et al., ZeRO (2020), Figure 1: 7.5B parameters on 64 GPUs take 16.6 GB
    per GPU with optimizer states and gradients partitioned, 1.9 GB with all three."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_real_size import full_finetune_memory

    def model_states_gb(stage):
        row = full_finetune_memory(int(7.5e9), 64, stage)
        return (row["weights"] + row["gradients"] + row["optimizer"]) / 1e9

    assert model_states_gb(2) == pytest.approx(16.6, abs=0.05)
    assert model_states_gb(3) == pytest.approx(1.9, abs=0.05)
    row = full_finetune_memory(1000, 4, 3, activations=7.0, buckets=5.0)
    assert row["total"] == 2000 / 4 * 2 + 12000 / 4 + 4000 / 4 + 12.0
    with pytest.raises(ValueError):
        full_finetune_memory(1000, 4, 1)


@pytest.mark.slow
def test_real_size_benchmark_smoke_mode(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_real_size.py"),
                          "--smoke"], env={**_env(), "OUT": str(tmp_path)},
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "bench_real_size.json").read_text())
    result = report["result"]
    policy = new_policy(lora_r=8)
    base = sum(p.numel() for n, p in policy.named_parameters() if ".lora_" not in n)
    heads = result["parameters"]["consistency_heads"]
    assert result["parameters"]["total"] == base + heads
    assert result["lora_params"]["adapter"] == sum(
        p.numel() for n, p in policy.named_parameters() if ".lora_" in n)
    assert len(result["step_ms_all"]) == 2 and result["step_ms_median"] > 0
    assert result["model_flops_per_step"] > 0 and result["mfu"] is None
    assert {"vlm_forward", "sampling", "scoring", "backward", "optimizer_step"} <= set(
        result["phases_ms"])
    rows = report["full_finetune_memory"]
    assert [(r["zero_stage"], r["gpus"]) for r in rows] == [
        (stage, gpus) for stage in (2, 3) for gpus in (2, 4, 8)]
