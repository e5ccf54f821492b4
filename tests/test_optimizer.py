"""--optimizer torch_fused_adamw: torch's fused AdamW as DeepSpeed's client optimiser steps
like DeepSpeed's own AdamW (to float32 rounding), at ZeRO 0, 2 and 3, under the trainer's
LR schedule, and resumes exactly.

Tolerance. Both optimisers evaluate the same float32 AdamW formulas (decay, moments, bias
corrections, update) in different kernels, so each update of a parameter may round
differently by a few float32 ulps of |p| and of the step size lr |m / sqrt(v)| <= lr
(Adam's normalised step). Over S updates that is at most
``S * ULPS * eps32 * (max|p| + lr)`` per element, ULPS = 8 roundings per update
(generous: a handful of operations each rounds once). Where the losses feed back into the
gradients (the trainer runs), the parameter difference enters the next step's gradient, and
Adam divides by sqrt(v), so the same bound holds up to that feedback; the losses are compared
to 1e-5 relative (about 80 float32 ulps; what we see is 1 ulp). A real difference is far
larger: weight decay left out changes each step by lr * wd * |p| (1e-4 |p| here), which
test_a_wrong_setting_is_outside_the_tolerance shows to be outside the bound.
"""

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import deepspeed
import pytest
import torch
from torch import nn

from srdrl.config import TrainConfig
from srdrl.engine import initialize_engine, resolve_deepspeed_config
from srdrl.errors import ConfigError
from srdrl.optimizer import client_adamw_settings
from srdrl.train import check_same_optimizer

EPS32 = torch.finfo(torch.float32).eps
ULPS_PER_UPDATE = 8
LR = 1e-2


def rounding_bound(weights: dict, steps: int, lr: float) -> float:
    """The largest parameter difference rounding alone explains (module docstring)."""
    largest = max(w.abs().max().item() for w in weights.values())
    return steps * ULPS_PER_UPDATE * EPS32 * (largest + lr)


# --------------------------------------------------------------------------- in process


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x, y):
        return ((self.body(x) - y) ** 2).mean()


@pytest.fixture(scope="module")
def group():
    if not torch.distributed.is_initialized():
        from srdrl.engine import init_distributed

        init_distributed()


def ds_config(stage: int, weight_decay: float = 0.01) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "train_batch_size": 4, "zero_optimization": {"stage": stage},
            "gradient_clipping": 1.0, "bf16": {"enabled": False},
            "optimizer": {"type": "AdamW", "params": {
                "lr": LR, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": weight_decay,
                "torch_adam": True}}}


def schedule(step: int) -> float:
    return 1 / (1 + step)


def engine_for(stage: int, optimizer: str, weight_decay: float = 0.01):
    torch.manual_seed(0)
    return initialize_engine(Toy(), ds_config(stage, weight_decay), optimizer, schedule)


def run(engine, steps: int, seed: int = 3) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def weights(engine) -> dict:
    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
              if engine.zero_optimization_partition_weights() else nullcontext())
    with gather:
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_client_fused_adamw_steps_like_deepspeeds_adamw(group, stage):
    steps = 6
    reference, _ = engine_for(stage, "deepspeed_adamw")
    fused, scheduler = engine_for(stage, "torch_fused_adamw")
    assert isinstance(fused.basic_optimizer, torch.optim.AdamW)
    assert [g["fused"] for g in fused.basic_optimizer.param_groups] == [True]
    assert not reference.basic_optimizer.param_groups[0]["fused"]
    assert run(fused, steps) == pytest.approx(run(reference, steps), rel=1e-5)
    # the schedule drives the client optimiser's param groups
    assert scheduler.get_last_lr()[0] == pytest.approx(LR * schedule(steps))
    assert fused.optimizer.param_groups[0]["lr"] == pytest.approx(LR * schedule(steps))
    a, b = weights(reference), weights(fused)
    assert largest_difference(a, b) <= rounding_bound(a, steps, LR)
    assert largest_difference(a, weights(engine_for(stage, "deepspeed_adamw")[0])) > 0


def test_a_wrong_setting_is_outside_the_tolerance(group):
    steps = 6
    reference, _ = engine_for(2, "deepspeed_adamw")
    no_decay, _ = engine_for(2, "torch_fused_adamw", weight_decay=0.0)
    run(reference, steps)
    run(no_decay, steps)
    a = weights(reference)
    assert largest_difference(a, weights(no_decay)) > 10 * rounding_bound(a, steps, LR)


@pytest.mark.parametrize("stage", [2, 3])
def test_client_optimizer_resumes_exactly(group, tmp_path, stage):
    unbroken, _ = engine_for(stage, "torch_fused_adamw")
    run(unbroken, 2, seed=3)
    unbroken.save_checkpoint(str(tmp_path), tag="two")
    run(unbroken, 3, seed=4)
    resumed, scheduler = engine_for(stage, "torch_fused_adamw")
    resumed.load_checkpoint(str(tmp_path), tag="two")
    assert scheduler.last_epoch == 2
    run(resumed, 3, seed=4)
    a, b = weights(unbroken), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- configuration


def test_zero_takes_torch_adamw_without_the_untested_optimizer_switch():
    from deepspeed.runtime.zero.utils import is_zero_supported_optimizer

    assert is_zero_supported_optimizer(torch.optim.AdamW([nn.Parameter(torch.ones(1))],
                                                         fused=True))


def test_conflicting_optimizer_blocks_are_refused(tmp_path):
    good = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95],
                                                      "eps": 1e-8, "weight_decay": 0.01,
                                                      "torch_adam": True}}}
    assert client_adamw_settings(good, "x.json") == {"lr": 1e-3, "betas": (0.9, 0.95),
                                                     "eps": 1e-8, "weight_decay": 0.01}
    assert client_adamw_settings({}, "x.json") == {}
    for block, words in [
        ({"optimizer": {"type": "Lamb"}}, "optimizer.type = 'Lamb' conflicts"),
        ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, "L2 decay"),
        ({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}}, "amsgrad not used"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload"),
    ]:
        with pytest.raises(ConfigError, match=words):
            client_adamw_settings(block, "x.json")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "SGD", "params": {"lr": 1e-3}}}))
    with pytest.raises(ConfigError, match=r"ds\.json: optimizer\.type = 'SGD'"):
        resolve_deepspeed_config(TrainConfig(deepspeed_config=str(path), learning_rate=1e-3,
                                             optimizer="torch_fused_adamw"), 1)
    resolve_deepspeed_config(TrainConfig(deepspeed_config=str(path), learning_rate=1e-3), 1)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="sgd")


def test_a_checkpoint_resumes_only_under_its_optimizer():
    check_same_optimizer({"srdrl_optimizer": "torch_fused_adamw"}, "torch_fused_adamw")
    check_same_optimizer({}, "deepspeed_adamw")  # saved before --optimizer existed
    with pytest.raises(Exception, match="resume with --optimizer deepspeed_adamw"):
        check_same_optimizer({}, "torch_fused_adamw")


# --------------------------------------------------------------------------- the trainer


def _train(out, data, *flags, check=True):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "srdrl.train", "--data_path", str(data), "--output_dir",
           str(out), "--per_device_train_batch_size", "2", "--max_steps", "3",
           "--eval_samples", "0", "--num_trajectory_samples", "2", "--flow_steps", "2",
           "--scoring_backend", "kornia", "--warmup_steps", "1", "--logging_steps", "1",
           "--dataloader_workers", "0", *flags]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if not check:
        return run
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _losses(rows):
    return [(r["step"], r["lr"], r["loss"], r["traj_loss"], r["awr_loss"], r["language_loss"])
            for r in rows]


@pytest.fixture(scope="module")
def fused_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused")
    return out, _train(out, data, "--optimizer", "torch_fused_adamw")


@pytest.mark.slow
def test_trainer_with_fused_adamw_matches_deepspeeds(tmp_path, data, fused_run):
    from safetensors.torch import load_file

    out, fused = fused_run
    plain = _train(tmp_path / "plain", data)
    for p, f in zip(_losses(plain), _losses(fused), strict=True):
        assert p[:2] == f[:2]  # step and learning rate
        assert f[2:] == pytest.approx(p[2:], rel=1e-5), (p, f)
    a = load_file(tmp_path / "plain" / "policy" / "model.safetensors")
    b = load_file(out / "policy" / "model.safetensors")
    lr = json.loads((out / "train_config.json").read_text())["train"]["learning_rate"]
    assert largest_difference(a, b) <= rounding_bound(a, len(plain), lr)


@pytest.mark.slow
def test_trainer_with_fused_adamw_resumes_exactly(tmp_path, data, fused_run):
    _, unbroken = fused_run
    out = tmp_path / "b"
    first = _train(out, data, "--optimizer", "torch_fused_adamw", "--stop_after_steps", "1")
    assert [r["step"] for r in first] == [1]
    refused = _train(out, data, "--resume", check=False)  # the default optimizer
    assert refused.returncode == 2 and "resume with --optimizer torch_fused_adamw" in \
        refused.stderr, refused.stderr[-2000:]
    resumed = _train(out, data, "--optimizer", "torch_fused_adamw", "--resume")
    assert _losses(resumed) == _losses(unbroken)  # bit for bit, on CPU
