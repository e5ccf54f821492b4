"""Checkpoints: exact round trips, fallback past damaged or unfinished ones, no code run on
load, a used or unwritable output_dir refused up front, pruning, refused NaN exports.

Real ``deepspeed.initialize`` engines around a tiny module, in a process group of one (gloo
on CPU), so DeepSpeed's own files, names and load paths are exercised. Tests run as root
here, where ``chmod`` does not stop writes: an unwritable folder is made by putting it
under a regular file (mkdir fails with ENOTDIR), or by making ``checkpoints`` a file.
"""

import functools
import json
import os
import random
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from srdrl.checkpoint import (
    MARKER,
    NonFiniteWeightsError,
    export_policy,
    load_checkpoint,
    save_checkpoint,
    write_policy,
)
from srdrl.run_folder import CHECKPOINTS, RUN_OUTPUTS, CheckpointError, prepare_output_dir

deepspeed = pytest.importorskip("deepspeed")
HERE = Path(__file__).resolve().parent


class TinyPolicy(nn.Module):
    """Stands in for VLAPolicy: parameters, a buffer and ``save_pretrained``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        self.register_buffer("mask", torch.tensor([0.0, float("-inf")]))  # -inf on purpose

    def save_pretrained(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu", copy=True).contiguous()
                   for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.policy = TinyPolicy()

    def forward(self, x, y):
        return ((self.policy.body(x).float() - y) ** 2).mean()


@pytest.fixture(scope="module")
def group():
    if not torch.distributed.is_initialized():
        from srdrl.engine import init_distributed

        init_distributed()
    return torch.distributed.get_rank()


def make_engine(stage: int, seed: int, bf16: bool = False, world: int = 1):
    torch.manual_seed(seed)
    module = Wrapped()
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "train_batch_size": 4 * world, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "gradient_clipping": 1.0, "bf16": {"enabled": bf16}}
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=module.parameters(), config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)))
    return engine


def batches(n: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)) for _ in range(n)]


def step(engine, batch):
    x, y = batch
    p = next(engine.module.parameters())
    loss = engine(x.to(engine.device, p.dtype), y.to(engine.device))
    engine.backward(loss)
    engine.step()


def weights(engine) -> dict:
    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
              if engine.zero_optimization_partition_weights() else nullcontext())
    with gather:
        return {n: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def progress(step_: int) -> dict:
    return {"global_step": step_, "epoch": step_ // 3, "micro_in_epoch": 5 * step_}


def saved_run(out: Path, steps, stage: int = 0, **save_kw) -> tuple:
    """An engine trained with a checkpoint after each of ``steps``; the weights at each."""
    engine, data, snaps = make_engine(stage, seed=1), batches(max(steps)), {}
    for s in range(1, max(steps) + 1):
        step(engine, data[s - 1])
        if s in steps:
            save_checkpoint(engine, out, progress(s), 0, **save_kw)
            snaps[s] = weights(engine)
    return engine, snaps


def reseal(folder: Path):
    """Make the completion marker agree with the files again, as an attacker could."""
    marker = json.loads((folder / MARKER).read_text())
    marker["files"] = {name: (folder / name).stat().st_size for name in marker["files"]}
    (folder / MARKER).write_text(json.dumps(marker))


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("stage,bf16", [(0, False), (2, False), (2, True), (3, False)],
                         ids=["zero0", "zero2", "zero2-bf16", "zero3"])
def test_round_trip_restores_weights_optimizer_schedule_and_rng(tmp_path, group, stage, bf16):
    data = batches(3)
    a = make_engine(stage, seed=1, bf16=bf16)
    step(a, data[0])
    step(a, data[1])
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    folder = save_checkpoint(a, tmp_path, progress(2), 0, train_config={"lr": 0.01},
                             export=functools.partial(write_policy, a.module.policy))
    at_save, after_save = weights(a), draws()
    step(a, data[2])
    b = make_engine(stage, seed=2, bf16=bf16)
    assert not torch.equal(weights(b)["policy.body.0.weight"], at_save["policy.body.0.weight"])
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert load_checkpoint(b, tmp_path, 0) == progress(2)
    assert_same(weights(b), at_save)
    assert draws() == after_save
    step(b, data[2])  # Adam moments and the LR schedule must match for this to agree
    assert_same(weights(b), weights(a))
    assert b.get_lr() == a.get_lr()
    # the export inside the checkpoint: float32, the whole (gathered) weights
    exported = load_file(folder / "policy" / "model.safetensors")
    for name, value in at_save.items():
        assert exported[name.removeprefix("policy.")].dtype == torch.float32
        assert torch.equal(exported[name.removeprefix("policy.")], value), name
    assert json.loads((folder / "train_config.json").read_text()) == {"lr": 0.01}
    assert "policy/model.safetensors" in json.loads((folder / MARKER).read_text())["files"]


# --------------------------------------------------------------------------- fallback


@pytest.mark.parametrize("latest", ["missing", "empty", "garbage"])
def test_broken_latest_falls_back_to_newest_complete(tmp_path, group, capsys, latest):
    _, snaps = saved_run(tmp_path, [1, 2])
    path = tmp_path / CHECKPOINTS / "latest"
    if latest == "missing":
        path.unlink()
    else:
        path.write_bytes(b"" if latest == "empty" else b"\xff\x00../../etc")
    fresh = make_engine(0, seed=3)
    assert load_checkpoint(fresh, tmp_path, 0) == progress(2)
    assert_same(weights(fresh), snaps[2])
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "resuming from checkpoint-2" in message
    assert {"missing": "is missing", "empty": "is empty",
            "garbage": "not a checkpoint folder"}[latest] in message


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_latest_folder_falls_back(tmp_path, group, capsys, damage):
    _, snaps = saved_run(tmp_path, [1, 2], stage=2)
    model = tmp_path / CHECKPOINTS / "checkpoint-2" / "mp_rank_00_model_states.pt"
    size = model.stat().st_size
    if damage == "truncated":
        model.write_bytes(model.read_bytes()[: size // 2])
    else:  # same size, so only reading it can tell
        model.write_bytes(np.random.default_rng(0).bytes(size))
    fresh = make_engine(2, seed=3)
    assert load_checkpoint(fresh, tmp_path, 0) == progress(1)
    assert_same(weights(fresh), snaps[1])
    message = capsys.readouterr().err
    assert "skipped checkpoint-2 (" in message and "resuming from checkpoint-1" in message
    if damage == "truncated":
        assert f"mp_rank_00_model_states.pt has {size // 2} bytes, {size} when saved" in message


def test_interrupted_save_is_never_loaded(tmp_path, group, capsys, monkeypatch):
    """A save that dies half way (here: the disk fills on DeepSpeed's second file) while
    re-saving step 2, which ``latest`` names: the mixed folder is skipped."""
    engine, snaps = saved_run(tmp_path, [1, 2], stage=2)
    save = engine.checkpoint_engine.save
    calls = []

    def fill_disk(state_dict, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        save(state_dict, path)

    monkeypatch.setattr(engine.checkpoint_engine, "save", fill_disk)
    step(engine, batches(3)[2])
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(engine, tmp_path, progress(2), 0)
    assert (tmp_path / CHECKPOINTS / "latest").read_text() == "checkpoint-2"
    fresh = make_engine(2, seed=3)
    assert load_checkpoint(fresh, tmp_path, 0) == progress(1)
    assert_same(weights(fresh), snaps[1])
    assert f"skipped checkpoint-2 (no {MARKER}: its save did not finish)" in capsys.readouterr().err


def test_no_checkpoint_and_only_incomplete_ones(tmp_path, group, capsys):
    fresh = make_engine(0, seed=3)
    assert load_checkpoint(fresh, tmp_path, 0) is None
    saved_run(tmp_path, [1])
    (tmp_path / CHECKPOINTS / "checkpoint-1" / MARKER).unlink()
    assert load_checkpoint(fresh, tmp_path, 0) is None
    assert "no complete checkpoint: starting from step 0" in capsys.readouterr().err
    old_style = tmp_path / "old"
    (old_style / CHECKPOINTS / "step4").mkdir(parents=True)  # srdrl's earlier layout
    with pytest.raises(CheckpointError, match="holds no checkpoint-<step> folder, only step4"):
        load_checkpoint(fresh, old_style, 0)


def test_explicit_checkpoint_is_loaded_exactly_or_refused(tmp_path, group):
    _, snaps = saved_run(tmp_path, [1, 2])
    fresh = make_engine(0, seed=3)
    one = tmp_path / CHECKPOINTS / "checkpoint-1"
    assert load_checkpoint(fresh, tmp_path, 0, path=one) == progress(1)
    assert_same(weights(fresh), snaps[1])
    (one / MARKER).unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-1: no complete\.json"):
        load_checkpoint(fresh, tmp_path, 0, path=one)
    with pytest.raises(CheckpointError, match="checkpoint-9: no such folder"):
        load_checkpoint(fresh, tmp_path, 0, path=tmp_path / CHECKPOINTS / "checkpoint-9")


# --------------------------------------------------------------------------- no code on load


class RunsCode:
    """Unpickling this writes ``flag``: what a crafted checkpoint file could do."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return exec, (f"open({str(self.flag)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("file", ["rng_rank0.pt", "mp_rank_00_model_states.pt"])
def test_crafted_pickle_is_refused_without_running(tmp_path, group, file):
    saved_run(tmp_path, [1])
    folder = tmp_path / CHECKPOINTS / "checkpoint-1"
    # the payload is live: a plain torch.load runs it
    proof = tmp_path / "proof.pt"
    torch.save(RunsCode(tmp_path / "ran_in_proof"), proof)
    torch.load(proof, weights_only=False)
    assert (tmp_path / "ran_in_proof").is_file()

    flag = tmp_path / "ran_on_resume"
    torch.save(RunsCode(flag), folder / file)
    reseal(folder)
    fresh = make_engine(0, seed=3)
    with pytest.raises(CheckpointError, match=r"checkpoint-1 \(.*Unsupported global.*exec"):
        load_checkpoint(fresh, tmp_path, 0)
    with pytest.raises(CheckpointError, match=r"checkpoint-1: .*Unsupported global"):
        load_checkpoint(fresh, tmp_path, 0, path=folder)
    assert not flag.exists()


# --------------------------------------------------------------------------- output_dir


@pytest.mark.parametrize("used", RUN_OUTPUTS)
def test_used_output_dir_is_refused_without_resume_or_overwrite(tmp_path, used):
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    if "." in used:
        (out / used).write_text("{}")
    else:
        (out / used / "sub").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=rf"{out} already holds a run \({used}\); pass "
                                              r"--resume .* --overwrite_output_dir"):
        prepare_output_dir(out, resume=False, overwrite=False, rank=0)
    prepare_output_dir(out, resume=True, overwrite=False, rank=0)
    assert (out / used).exists()


def test_overwrite_removes_the_run_and_keeps_data(tmp_path):
    out = tmp_path / "run"
    for name in RUN_OUTPUTS:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).mkdir() if "." not in name else (out / name).write_text("{}")
        if "." not in name:
            (out / name / "f").write_text("x")
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    prepare_output_dir(out, resume=False, overwrite=True, rank=0)
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINTS, "data", "notes.txt"]
    assert not any((out / CHECKPOINTS).iterdir())  # made empty by the writability probe
    assert (out / "data" / "train.jsonl").read_text() == "{}\n"
    prepare_output_dir(out, resume=False, overwrite=False, rank=0)  # an empty folder is unused


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match=f"{blocker / 'run'} cannot be written"):
        prepare_output_dir(blocker / "run", resume=False, overwrite=False, rank=0)
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINTS).write_text("")
    with pytest.raises(CheckpointError, match=f"{out / CHECKPOINTS} is a file, not a folder"):
        prepare_output_dir(out, resume=True, overwrite=False, rank=0)


def test_flags_and_their_conflicts():
    from srdrl.cli import parse_config
    from srdrl.config import ObjectiveConfig, RewardConfig, TrainConfig

    cfg, *_ = parse_config((TrainConfig, ObjectiveConfig, RewardConfig),
                           ["--resume_from_checkpoint", "runs/x/checkpoints/checkpoint-4",
                            "--save_total_limit", "3"], prog="srdrl-train", description="")
    assert cfg.resume and cfg.save_total_limit == 3 and not cfg.overwrite_output_dir
    with pytest.raises(ValueError, match="save_total_limit must be >= 1"):
        TrainConfig(save_total_limit=0)
    for flags in ({"resume": True}, {"resume_from_checkpoint": "c"}):
        with pytest.raises(ValueError, match="pass one of them"):
            TrainConfig(overwrite_output_dir=True, **flags)
    assert TrainConfig(resume_from_checkpoint="").resume_from_checkpoint is None


# --------------------------------------------------------------------------- pruning


def test_save_total_limit_keeps_newest_and_the_one_just_written(tmp_path, group):
    engine, _ = saved_run(tmp_path, [1, 2, 3, 4, 5], save_total_limit=2)
    root = tmp_path / CHECKPOINTS
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    (root / "checkpoint-9").mkdir()  # an unfinished save: not counted, not removed
    # after --resume_from_checkpoint of an older step, the step just saved is kept
    save_checkpoint(engine, tmp_path, progress(3), 0, save_total_limit=2)
    assert sorted(p.name for p in root.glob("checkpoint-*")) == [
        "checkpoint-3", "checkpoint-5", "checkpoint-9"]
    assert (root / "latest").read_text() == "checkpoint-3"


# --------------------------------------------------------------------------- export


def test_export_refuses_non_finite_weights_and_keeps_the_last_good_one(tmp_path, group):
    engine = make_engine(0, seed=1)
    good = export_policy(engine, tmp_path, 0, zero_stage=0)
    before = (good / "model.safetensors").read_bytes()
    with torch.no_grad():
        engine.module.policy.body[2].weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"body\.2\.weight has 1 NaN or inf"):
        export_policy(engine, tmp_path, 0, zero_stage=0)
    assert (good / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no partial folder
    save_checkpoint(engine, tmp_path, progress(1), 0)
    with pytest.raises(NonFiniteWeightsError):
        save_checkpoint(engine, tmp_path, progress(2), 0,
                        export=functools.partial(write_policy, engine.module.policy))
    assert not (tmp_path / CHECKPOINTS / "checkpoint-2" / MARKER).exists()
    assert (tmp_path / CHECKPOINTS / "latest").read_text() == "checkpoint-1"


def test_export_leaves_live_bf16_parameters_in_place(tmp_path, group):
    """Under ZeRO-2 bf16 the parameters are views into DeepSpeed's flat buffer (and, on GPU,
    what a captured CUDA graph reads); the float32 export must not replace them."""
    engine = make_engine(2, seed=1, bf16=True)
    params = list(engine.module.parameters())
    pointers = [(p.data_ptr(), p.dtype) for p in params]
    export_policy(engine, tmp_path, 0, zero_stage=2)
    assert [(p.data_ptr(), p.dtype) for p in params] == pointers
    exported = load_file(tmp_path / "policy" / "model.safetensors")
    for name, p in engine.module.policy.named_parameters():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], p.float())
    before = weights(engine)
    step(engine, batches(1)[0])  # the optimiser still updates what the module computes with
    assert not torch.equal(weights(engine)["policy.body.0.weight"],
                           before["policy.body.0.weight"])


# --------------------------------------------------------------------------- two ranks


def two_rank_worker(out: str, result: str) -> None:
    """Rank 1 cannot read its RNG file of checkpoint-2 (same size, garbage): both ranks must
    skip it and load checkpoint-1, never split between steps."""
    from srdrl.engine import init_distributed

    rank, world, _ = init_distributed()
    out = Path(out)
    engine, data = make_engine(2, seed=1, world=world), batches(2, seed=7 + rank)
    snaps = {}
    for s in (1, 2):
        step(engine, data[s - 1])
        save_checkpoint(engine, out, progress(s), rank)
        snaps[s] = weights(engine)
    torch.distributed.barrier()
    if rank == 1:
        rng = out / CHECKPOINTS / "checkpoint-2" / "rng_rank1.pt"
        rng.write_bytes(bytes(rng.stat().st_size))
    torch.distributed.barrier()
    fresh = make_engine(2, seed=3, world=world)
    loaded = load_checkpoint(fresh, out, rank)
    same = all(torch.equal(v, snaps[1][k]) for k, v in weights(fresh).items())
    Path(f"{result}.{rank}").write_text(json.dumps({"progress": loaded, "weights_at_1": same}))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree_when_only_one_cannot_read(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 500))
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_checkpoint as t; "
            f"t.two_rank_worker({str(tmp_path / 'run')!r}, {str(tmp_path / 'result')!r})")
    runs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r),
                                                                  "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in (0, 1)]
    outputs = [r.communicate(timeout=600)[0] for r in runs]
    assert all(r.returncode == 0 for r in runs), "\n".join(o[-3000:] for o in outputs)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.{rank}").read_text())
        assert result == {"progress": progress(1), "weights_at_1": True}
    assert "rank 1: " in outputs[0] and "skipped checkpoint-2" in outputs[0]


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_round_trip_on_gpu_loads_weights_only(tmp_path, group, stage):
    a = make_engine(stage, seed=1, bf16=True)
    step(a, batches(1)[0])
    save_checkpoint(a, tmp_path, progress(1), 0,
                    export=functools.partial(write_policy, a.module.policy))
    b = make_engine(stage, seed=2, bf16=True)
    assert load_checkpoint(b, tmp_path, 0) == progress(1)
    assert_same(weights(b), weights(a))
