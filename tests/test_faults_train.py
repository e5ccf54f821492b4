"""Fault injection for the trainer: each fault ends in a clear error or documented handling.

The catalogue (docs/DESIGN.md, "The DeepSpeed engine" and "Checkpoints"): divergence,
bad DeepSpeed configs, a used output folder, a damaged or missing ``latest``, SIGTERM,
epoch edges and metrics.jsonl after a resume. Data and camera faults are in
tests/test_faults_data.py, checkpoint-file faults in tests/test_checkpoint.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srdrl.config import TrainConfig
from srdrl.data.synthetic import SyntheticDataConfig, make_dataset
from srdrl.engine import resolve_deepspeed_config
from srdrl.errors import ConfigError

TIMING_KEYS = ("step_time_s", "scenes_per_s")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_data")
    make_dataset(SyntheticDataConfig(output_dir=str(root), num_scenes=9, width=128, height=96,
                                     seed=5, label_noise=0.5), progress=False)
    return root / "train.jsonl"  # 8 training scenes, 1 validation scene


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _command(out, data, *flags):
    return [sys.executable, "-m", "srdrl.train", "--data_path", str(data), "--output_dir",
            str(out), "--per_device_train_batch_size", "2", "--eval_samples", "0",
            "--num_trajectory_samples", "2", "--flow_steps", "2", "--scoring_backend",
            "kornia", "--warmup_steps", "1", "--logging_steps", "1",
            "--dataloader_workers", "0", *flags]


def _run(out, data, *flags, timeout=600):
    return subprocess.run(_command(out, data, *flags), env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _rows(out):
    def strict(token):
        raise ValueError(f"non-standard JSON token {token}")

    text = (Path(out) / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=strict) for line in text.splitlines()]


def _one_line_error(run, *words):
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


# --------------------------------------------------------------------------- configs


def test_deepspeed_config_faults_name_the_file_and_both_values(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  "bf16": {enabled: true}\n}')
    with pytest.raises(ConfigError, match=r"ds\.json:3: invalid JSON"):
        resolve_deepspeed_config(TrainConfig(deepspeed_config=str(path)), 1)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"ds\.json: a DeepSpeed config is a JSON object"):
        resolve_deepspeed_config(TrainConfig(deepspeed_config=str(path)), 1)
    for block, flag in [({"gradient_accumulation_steps": 4}, "--gradient_accumulation_steps"),
                        ({"train_micro_batch_size_per_gpu": 16}, "--per_device_train_batch_size"),
                        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}},
                         "--learning_rate"),
                        ({"zero_optimization": {"stage": 1}}, "--zero_stage")]:
        path.write_text(json.dumps(block))
        cfg = TrainConfig(deepspeed_config=str(path), zero_stage=2)
        with pytest.raises(ConfigError, match=f"conflicts with {flag}"):
            resolve_deepspeed_config(cfg, 1)
    path.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError, match="'scheduler' block is not used"):
        resolve_deepspeed_config(TrainConfig(deepspeed_config=str(path)), 1)
    # agreeing values are fine, and the built-in file's values are defaults the flags replace
    path.write_text(json.dumps({"gradient_accumulation_steps": 2,
                                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    ds = resolve_deepspeed_config(TrainConfig(deepspeed_config=str(path), learning_rate=1e-3,
                                              gradient_accumulation_steps=2), 1)
    assert ds["gradient_accumulation_steps"] == 2
    ds = resolve_deepspeed_config(TrainConfig(zero_stage=3, learning_rate=5e-4), 1)
    assert ds["zero_optimization"]["stage"] == 3 and ds["optimizer"]["params"]["lr"] == 5e-4


def test_user_errors_end_in_one_line_and_exit_code_2(tmp_path, data):
    _one_line_error(_run(tmp_path / "a", data.parent), "--data_path", "is a directory",
                    "train.jsonl")
    bad = tmp_path / "ds.json"
    bad.write_text("{")
    _one_line_error(_run(tmp_path / "b", data, "--deepspeed_config", str(bad)), str(bad),
                    "invalid JSON")


# --------------------------------------------------------------------------- the loop


@pytest.mark.slow
def test_divergence_stops_the_run_and_exports_nothing(tmp_path, data):
    out = tmp_path / "nan"
    run = _run(out, data, "--learning_rate", "10", "--zero_stage", "0", "--max_steps", "40",
               "--save_steps", "1")
    line = _one_line_error(run, "training diverged at step")
    step = int(line.split("training diverged at step ")[1].split(":")[0])
    assert not (out / "policy").exists()  # nothing exported
    rows = _rows(out)
    assert rows and all(r["loss"] is not None for r in rows)  # only finite steps logged
    assert max(r["step"] for r in rows) == step - 1
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1].name == f"checkpoint-{step - 1}"


@pytest.mark.slow
def test_used_output_dir_is_refused_without_resume_or_overwrite(tmp_path, data):
    out = tmp_path / "run"
    assert _run(out, data, "--max_steps", "1").returncode == 0
    before = (out / "metrics.jsonl").read_text()
    _one_line_error(_run(out, data, "--max_steps", "1"), str(out), "--resume",
                    "--overwrite_output_dir")
    assert (out / "metrics.jsonl").read_text() == before  # nothing mixed in
    again = _run(out, data, "--max_steps", "2", "--overwrite_output_dir")
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["step"] for r in _rows(out)] == [1, 2]


@pytest.mark.slow
def test_epochs_are_whole_micro_batches_and_windows(tmp_path, data):
    # 8 scenes, batch 3, accumulation 2: 2 whole micro-batches (6 scenes) a window, 1 step
    # per epoch; 3 epochs = 3 steps, every micro-batch of 3 scenes
    out = tmp_path / "epochs"
    run = _run(out, data, "--per_device_train_batch_size", "3",
               "--gradient_accumulation_steps", "2", "--num_train_epochs", "3")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["consistency_loss"] > 0 for r in rows)  # never a micro-batch of one scene


@pytest.mark.slow
def test_metrics_after_a_resume_continue_as_an_unbroken_run(tmp_path, data):
    flags = ["--max_steps", "4", "--logging_steps", "2"]
    unbroken = tmp_path / "a"
    assert _run(unbroken, data, *flags).returncode == 0
    broken = tmp_path / "b"
    assert _run(broken, data, *flags, "--stop_after_steps", "3").returncode == 0
    # a crash after the checkpoint at step 3 leaves rows the resume must not duplicate
    with open(broken / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    resumed = _run(broken, data, *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    assert strip(_rows(broken)) == strip(_rows(unbroken))  # the window 3-4 spans the resume


@pytest.mark.slow
def test_damaged_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, data):
    out = tmp_path / "fallback"
    first = _run(out, data, "--max_steps", "4", "--save_steps", "1", "--stop_after_steps", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    (out / "checkpoints" / "latest").write_text("")  # what a crash while writing it leaves
    resumed = _run(out, data, "--max_steps", "4", "--save_steps", "1", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 2" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, data):
    out = tmp_path / "term"
    proc = subprocess.Popen(_command(out, data, "--max_steps", "200"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "SIGTERM: saved a checkpoint at step" in stderr
    saved = int(stderr.split("checkpoint at step ")[1].split()[0])
    assert (out / "checkpoints" / f"checkpoint-{saved}").is_dir()
    resumed = _run(out, data, "--max_steps", str(saved + 1), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in _rows(out)] == list(range(1, saved + 2))


def test_liger_kernels_without_cuda_is_a_one_line_error_before_any_work(tmp_path, data):
    run = _run(tmp_path / "out", data, "--liger_kernels", "--max_steps", "1", timeout=300)
    _one_line_error(run, "--liger_kernels needs a CUDA device", "cpu")
    assert not (tmp_path / "out").exists()


def test_more_anchors_than_labels_is_a_one_line_error_naming_the_file(tmp_path, data):
    run = _run(tmp_path / "out", data, "--num_anchors", "5000", "--max_steps", "1",
               timeout=300)
    _one_line_error(run, "--num_anchors 5000 needs at least 5000 training scenes",
                    "train.jsonl")
