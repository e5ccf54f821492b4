"""The trainer: bad configs fail early, resume is exact, 2 ranks equal 1 process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from srdrl.cli import parse_config
from srdrl.config import ObjectiveConfig, RewardConfig, TrainConfig
from srdrl.engine import resolve_deepspeed_config
from srdrl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DS_CONFIG = ROOT / "ds_config.json"


def parse_args(argv):
    return parse_config((TrainConfig, ObjectiveConfig, RewardConfig), argv, prog="srdrl-train",
                        description="")


def _env(gpu=False):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _train(out, data, *flags, ranks=None, batch=2, gpu=False):
    common = ["--data_path", str(data), "--output_dir", str(out),
              "--per_device_train_batch_size", str(batch), "--max_steps", "3",
              "--eval_samples", "0", "--num_trajectory_samples", "2", "--flow_steps", "2",
              "--scoring_backend", "kornia", "--warmup_steps", "1", "--logging_steps", "1",
              *flags]
    if ranks is None:
        cmd = [sys.executable, "-m", "srdrl.train", *common]
    else:
        launcher = shutil.which("deepspeed")
        if launcher is None:
            pytest.skip("the deepspeed launcher is not on PATH")
        cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(29500 + os.getpid() % 500),
               "--module", "srdrl.train", *common]
    run = subprocess.run(cmd, env=_env(gpu), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _losses(rows):
    return [(r["step"], r["loss"], r["traj_loss"], r["awr_loss"], r["language_loss"])
            for r in rows]


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, data):
    unbroken = _train(tmp_path / "a", data)
    first = _train(tmp_path / "b", data, "--stop_after_steps", "1")
    assert [r["step"] for r in first] == [1]
    resumed = _train(tmp_path / "b", data, "--resume")  # metrics.jsonl is appended to
    assert _losses(resumed) == _losses(unbroken)  # bit for bit, on CPU
    assert (tmp_path / "b" / "policy" / "model.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_gpu_from_pinned_batches_with_worker_processes(tmp_path, data):
    # on CUDA the DataLoader pins each batch and the VLM inputs are copied asynchronously;
    # two worker processes build them; the same seed gives the same losses as in-process
    # loading (bf16 on the GPU by the ds config's "auto", so within a tolerance)
    workers = _train(tmp_path / "w", data, "--dataloader_workers", "2", gpu=True)
    inline = _train(tmp_path / "i", data, "--dataloader_workers", "0", gpu=True)
    assert [r["step"] for r in workers] == [1, 2, 3]
    for a, b in zip(_losses(workers), _losses(inline), strict=True):
        assert a[0] == b[0] and np.allclose(a[1:], b[1:], rtol=2e-2, atol=1e-3), (a, b)


@pytest.mark.slow
def test_anchors_are_scored_and_resume_exactly(tmp_path, data):
    # the vocabulary is computed again from the same labels on resume: the same losses
    anchors = ("--num_anchors", "2")
    unbroken = _train(tmp_path / "a", data, *anchors)
    assert all(0.0 <= r["anchor_is_best"] <= 1.0 for r in unbroken)
    _train(tmp_path / "b", data, *anchors, "--stop_after_steps", "1")
    resumed = _train(tmp_path / "b", data, *anchors, "--resume")
    assert _losses(resumed) == _losses(unbroken)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_process(tmp_path, data, stage):
    # at ZeRO-3 the final evaluation is on: it must not need the partitioned parameters
    evaluation = ["--eval_samples", "1"] if stage == 3 else []
    single = _train(tmp_path / "one", data, "--zero_stage", str(stage), batch=2)
    double = _train(tmp_path / "two", data, "--zero_stage", str(stage), *evaluation, ranks=2,
                    batch=1)
    for s, d in zip(_losses(single), _losses(double), strict=True):
        assert s[0] == d[0]
        assert s[1:] == pytest.approx(d[1:], rel=1e-4, abs=1e-5), (s, d)
    if stage == 3:
        report = json.loads((tmp_path / "two" / "eval_report.json").read_text())
        assert report["scenes"] >= 1


@pytest.mark.slow
def test_a_seed_trains_the_same_at_zero_2_and_3(tmp_path, data):
    # ZeRO-3 samples inside the forward pass too, after the supervised draws: same noise
    zero2 = _train(tmp_path / "z2", data, "--zero_stage", "2")
    zero3 = _train(tmp_path / "z3", data, "--zero_stage", "3")
    for a, b in zip(_losses(zero2), _losses(zero3), strict=True):
        assert a[0] == b[0]
        assert a[1:] == pytest.approx(b[1:], rel=1e-4, abs=1e-5), (a, b)


def test_bad_configs_fail_early(tmp_path, data, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        parse_args(["--zero_stage", "5"])
    assert "zero_stage must be 0, 1, 2 or 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--max_steps", "0"])
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    with pytest.raises(ConfigError, match="unknown ZeRO stage 7"):
        resolve_deepspeed_config(TrainConfig(deepspeed_config=str(bad)), 1)
    bad.write_text(json.dumps({"train_batch_size": 6}))
    with pytest.raises(ValueError, match=r"train_batch_size 6 is not .* = 8"):
        resolve_deepspeed_config(TrainConfig(deepspeed_config=str(bad),
                                             per_device_train_batch_size=4), 2)
    with pytest.raises(ConfigError, match="DeepSpeed config not found"):
        resolve_deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "no.json")), 1)
    ds = resolve_deepspeed_config(TrainConfig(deepspeed_config=str(DS_CONFIG),
                                              per_device_train_batch_size=3,
                                              gradient_accumulation_steps=2), 4)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["bf16"]["enabled"] is False  # "auto" on a machine without CUDA
    assert ds["optimizer"]["params"]["torch_adam"] is True
    # no --deepspeed_config: the built-in file, whatever the working directory
    monkeypatch.chdir(tmp_path)
    builtin = resolve_deepspeed_config(TrainConfig(), 1)
    assert builtin["zero_optimization"]["stage"] == 2 and builtin["train_batch_size"] == 8


def test_missing_data_path_fails_with_its_name(tmp_path):
    run = subprocess.run([sys.executable, "-m", "srdrl.train", "--data_path",
                          str(tmp_path / "nope.jsonl"), "--output_dir", str(tmp_path / "o"),
                          "--deepspeed_config", str(DS_CONFIG)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "--data_path" in run.stderr and "nope.jsonl" in run.stderr


def test_help_explains_every_flag():
    run = subprocess.run([sys.executable, "-m", "srdrl.train", "--help"], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0
    for flag, words in [("--rl_loss_weight", "AWR"), ("--gt_trust_min", "Label weight"),
                        ("--resume", "latest checkpoint"), ("--data_path", "synthetic")]:
        entry = run.stdout.split(f"\n  {flag} ", 1)[1][:400]  # the flag's help entry
        assert words in " ".join(entry.split()), flag


@pytest.mark.slow
def test_lora_run_exports_merged_weights_and_adapters(tmp_path, data):
    from srdrl.policy import VLAPolicy

    out = tmp_path / "lora"
    _train(out, data, "--use_peft", "--lora_r", "4", "--save_steps", "2")
    for folder in (out / "policy", out / "checkpoints" / "checkpoint-2" / "policy"):
        assert (folder / "adapters" / "expert" / "adapter_model.safetensors").is_file()
        policy = VLAPolicy.from_pretrained(folder)  # plain names: the adapters merged in
        assert not any("lora_" in n for n, _ in policy.named_parameters())


@pytest.mark.slow
def test_original_script_lines_train_without_conversion(tmp_path, data):
    """Lines as the original script wrote them (four frames then the scoring image, no
    history) train with --frame_paths_layout frames_then_scoring_image."""
    lines = []
    for line in Path(data).read_text().splitlines():
        record = json.loads(line)
        frame = str(Path(data).parent / record["frame_paths"][-1])
        record["frame_paths"] = [frame] * 4 + [frame]
        del record["ego_history_xyz"]
        lines.append(json.dumps(record))
    original = tmp_path / "original.jsonl"
    original.write_text("\n".join(lines) + "\n")
    rows = _train(tmp_path / "run", original, "--frame_paths_layout", "frames_then_scoring_image")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and 0.0 <= r["safety"] <= 1.0 for r in rows)
