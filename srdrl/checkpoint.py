"""Training state on disk: checkpoints that are complete or ignored, read without running
code from the files, and a policy export that is whole or absent (docs/DESIGN.md,
"Checkpoints").

    output_dir/checkpoints/checkpoint-<global_step>/   DeepSpeed's files (progress as client
        state), rng_rank<r>.pt, train_config.json, policy/, complete.json (written last)
    output_dir/checkpoints/latest    the tag of the newest complete checkpoint
    output_dir/policy/               the final policy (export_policy)

DeepSpeed writes its files in place, so a kill leaves some cut short. Here every rank
saves, then rank 0 writes ``complete.json`` (each file's size, the world size, the progress
keys) and only then ``latest``, each renamed over the old. A folder without that marker, or
with a file of another size, is never loaded; resume falls back to the newest complete one
and says so in one line. Decisions that could differ between ranks are agreed by an
all-reduce, so the ranks never split.

Loading without running code: RNG states are stored as tensors, ints and floats and read
with ``torch.load(weights_only=True)``. DeepSpeed 0.19.8 reads its own files through
``engine.checkpoint_engine.load``, i.e. ``torch.load(weights_only=False)``, and no config
key changes that (the ``checkpoint`` block picks writers). So while loading, the engine's
checkpoint engine is wrapped by one that calls ``torch.load(weights_only=True)`` with the
four plain-data DeepSpeed classes its files hold allowed by ``torch.serialization.
safe_globals`` (scoped, not process-wide): the two loss scalers, ``ZeroStageEnum``,
``fragment_address``; that reads every file of ZeRO 0-3, fp32 and bf16. Not covered:
universal checkpoints (``load_universal_checkpoint``), whose loaders call
``torch.load(weights_only=False)`` directly; srdrl does not enable them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from srdrl.errors import UserError
from srdrl.run_folder import (
    CHECKPOINTS,
    EXPORT,
    TRAIN_CONFIG,
    CheckpointError,
    agree,
    all_or_none,
    describe,
    on_rank0,
    remove,
    write_atomic,
    write_json,
)

LATEST = "latest"
MARKER = "complete.json"
_TAG = re.compile(r"checkpoint-(\d+)")


class NonFiniteWeightsError(UserError):
    """An export refused because a weight is NaN or infinite: the run diverged."""


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """This process's Python, NumPy, torch (and current CUDA device) RNG states, as plain
    tensors, ints and floats that ``torch.load(weights_only=True)`` reads."""
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- save


def _whole_parameters(module: torch.nn.Module, partitioned: bool):
    """Under ZeRO-3 (``partitioned``) every rank gathers the full parameters."""
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()))


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER and not p.name.endswith(".tmp")}


def _checkpoint_folders(root: Path) -> list[Path]:
    """checkpoint-<N> folders under ``root``, highest step first."""
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and _TAG.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_TAG.fullmatch(p.name).group(1)), reverse=True)


def _incomplete(folder: Path) -> str | None:
    """None for a complete checkpoint folder, else what is wrong with it."""
    if not folder.is_dir():
        return "no such folder"
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
    except FileNotFoundError:
        return f"no {MARKER}: its save did not finish"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MARKER} is unreadable"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return (f"{name} has {path.stat().st_size} bytes, {size} when saved "
                    "(cut short or overwritten)")
    return None


def _prune(root: Path, keep: Path, limit: int) -> None:
    """Delete the oldest complete checkpoints so that ``limit`` remain, ``keep`` among them.
    The marker goes first, so an interrupted deletion leaves an incomplete folder."""
    others = [f for f in _checkpoint_folders(root) if f != keep and _incomplete(f) is None]
    for folder in others[limit - 1:]:
        (folder / MARKER).unlink()
        shutil.rmtree(folder)


def save_checkpoint(engine, out: Path, progress: dict, rank: int, *,
                    save_total_limit: int | None = None, train_config: dict | None = None,
                    export: Callable[[Path], object] | None = None) -> Path:
    """Write ``output_dir/checkpoints/checkpoint-<progress['global_step']>/``; every rank
    calls it. Each rank's RNG state and DeepSpeed's ``engine.save_checkpoint`` (progress as
    client state); then, with parameters whole (gathered under ZeRO-3), rank 0 calls
    ``export(folder / "policy")`` if given (e.g. ``functools.partial(write_policy,
    engine.module.policy)``); then rank 0 writes ``train_config.json`` (if given), the
    completion marker and ``latest``, and with ``save_total_limit`` removes the oldest
    complete checkpoints beyond it (never this one). A failure on any rank (a refused export,
    a full disk) raises on every rank and leaves this folder incomplete and ``latest`` as it
    was. Returns the folder."""
    if engine.checkpoint_engine.is_decoupled():
        raise CheckpointError("a decoupled DeepSpeed checkpoint writer finishes after "
                              "save_checkpoint returns, so srdrl cannot tell when a checkpoint "
                              "is complete; remove checkpoint.writer.decoupled from the config")
    root = Path(out) / CHECKPOINTS
    folder = root / f"checkpoint-{progress['global_step']}"
    # saving a step again (e.g. a stop signal right after a periodic save): the old marker
    # must not vouch for files that are about to be rewritten
    on_rank0(rank, lambda: (folder / MARKER).unlink(missing_ok=True))

    def write_rng():
        folder.mkdir(parents=True, exist_ok=True)
        rng_file = folder / f"rng_rank{rank}.pt"
        torch.save(rng_state(), rng_file.with_name(rng_file.name + ".tmp"))
        os.replace(rng_file.with_name(rng_file.name + ".tmp"), rng_file)

    all_or_none(write_rng)
    engine.save_checkpoint(str(root), tag=folder.name, client_state=progress,
                           save_latest=False)  # ends in a barrier
    if export is not None:
        with _whole_parameters(engine.module, engine.zero_optimization_partition_weights()):
            on_rank0(rank, lambda: export(folder / EXPORT))

    def finish():
        if train_config is not None:
            write_json(folder / TRAIN_CONFIG, train_config)
        write_json(folder / MARKER, {"global_step": progress["global_step"],
                                     "progress_keys": sorted(progress),
                                     "world_size": torch.distributed.get_world_size(),
                                     "files": _file_sizes(folder)})
        write_atomic(root / LATEST, folder.name)
        if save_total_limit is not None:
            _prune(root, folder, save_total_limit)

    on_rank0(rank, finish)
    return folder


# --------------------------------------------------------------------------- load


def _deepspeed_data_classes() -> list:
    """The DeepSpeed classes pickled in its checkpoint files: plain data, no code on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyReader:
    """A DeepSpeed checkpoint engine whose ``load`` reads with ``weights_only=True``;
    everything else goes to the engine it wraps."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_data_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def _weights_only_loads(engine):
    original = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyReader(original)
    try:
        yield
    finally:
        engine.checkpoint_engine = original


class _Unusable(Exception):
    """A checkpoint folder that is incomplete or does not fit this run; the message says why."""


def _load_one(engine, folder: Path, rank: int) -> dict:
    """Load a checkpoint folder into ``engine`` and this process's RNG; the progress dict.
    Raises (anything) when the folder is incomplete or cannot be read."""
    problem = _incomplete(folder)
    if problem is not None:
        raise _Unusable(problem)
    marker = json.loads((folder / MARKER).read_text())
    world = torch.distributed.get_world_size()
    if marker["world_size"] != world:
        raise _Unusable(f"saved by {marker['world_size']} ranks, this run has {world} (ZeRO "
                         "optimizer partitions and per-rank RNG states do not carry over)")
    rng = torch.load(folder / f"rng_rank{rank}.pt", weights_only=True)
    with _weights_only_loads(engine):
        loaded, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if loaded is None:
        raise _Unusable("DeepSpeed found no model states in it")
    set_rng_state(rng)
    return {k: client_state[k] for k in marker["progress_keys"]}


def _try_load(engine, folder: Path, rank: int) -> tuple[dict | None, str | None]:
    """(progress, None) when every rank loaded ``folder``, else (None, the first reason)."""
    progress = error = None
    try:
        progress = _load_one(engine, folder, rank)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, with why
        error = str(e) if isinstance(e, _Unusable) else describe(e)
    error = agree(error)
    return (None, error) if error is not None else (progress, None)


def _resume_order(root: Path) -> tuple[list[Path], list[str]]:
    """The folders to try (the one ``latest`` names, then the rest newest first) and notes
    on ``latest`` itself."""
    folders = _checkpoint_folders(root)
    if not folders:
        others = sorted(p.name for p in root.glob("*") if p.is_dir())
        note = f"{root} holds no checkpoint-<step> folder, only {', '.join(others[:4])}"
        return [], [note] if others else []
    latest = root / LATEST
    tag = latest.read_text(errors="replace").strip() if latest.is_file() else None
    if tag is None:
        return folders, [f"{latest} is missing"]
    if not tag:
        return folders, [f"{latest} is empty"]
    if not _TAG.fullmatch(tag) or root / tag not in folders:
        return folders, [f"{latest} names {tag[:80]!r}, which is not a checkpoint folder"]
    return [root / tag] + [f for f in folders if f != root / tag], []


def load_checkpoint(engine, out: Path, rank: int, path: Path | None = None) -> dict | None:
    """Resume: restore engine (weights, optimizer, scheduler) and RNG; return the progress
    dict saved with it. Every rank calls it.

    With ``path`` (--resume_from_checkpoint), exactly that folder, or CheckpointError. Without,
    the folder ``latest`` names if it is complete and loads, else the newest complete one
    that loads, printing one line on what was skipped and why; None (with a line if
    incomplete folders were skipped) when no complete checkpoint exists; CheckpointError when
    complete ones exist but none loads (nothing is silently restarted from step 0)."""
    if path is not None:
        progress, error = _try_load(engine, Path(path), rank)
        if error is not None:
            raise CheckpointError(f"--resume_from_checkpoint {path}: {error}")
        return progress
    root = Path(out) / CHECKPOINTS
    order, notes = _resume_order(root) if rank == 0 else ([], [])
    if torch.distributed.is_initialized():  # every rank tries the same folders in order
        shared = [(order, notes)]
        torch.distributed.broadcast_object_list(shared, src=0)
        order, notes = shared[0]
    if not order and notes:
        raise CheckpointError(f"--resume: {notes[0]} (from an older srdrl?); move them away "
                              "or start over with --overwrite_output_dir")
    skipped, unreadable = [], False
    for folder in order:
        progress, error = _try_load(engine, folder, rank)
        if progress is not None:
            if rank == 0 and (notes or skipped):
                _say(notes + skipped + [f"resuming from {folder.name}"])
            return progress
        skipped.append(f"skipped {folder.name} ({error})")
        unreadable |= _incomplete(folder) is None
    if unreadable:
        raise CheckpointError(f"no checkpoint in {root} could be loaded: "
                              + "; ".join(notes + skipped))
    if rank == 0 and skipped:
        _say(notes + skipped + ["no complete checkpoint: starting from step 0"])
    return None


def _say(parts: list[str]) -> None:
    print("resume: " + "; ".join(parts), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- export


def _first_non_finite(policy: torch.nn.Module) -> str | None:
    """The first parameter holding NaN or inf, with how many (buffers such as masks may hold
    -inf on purpose; parameters never should)."""
    for name, tensor in policy.named_parameters():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            return f"{name} has {bad} NaN or infinite values of {tensor.numel()}"
    return None


@contextlib.contextmanager
def _float32_on_cpu(policy: torch.nn.Module):
    """Point the policy's floating tensors at float32 CPU copies, then back at the very same
    tensors: a ``.float()`` then ``.to(dtype)`` round trip would leave new tensors that are
    no longer views into DeepSpeed's flat bf16 buffers nor the memory a CUDA graph reads."""
    tensors = [t for t in chain(policy.parameters(), policy.buffers()) if t.is_floating_point()]
    originals = [t.data for t in tensors]
    try:
        for t, data in zip(tensors, originals, strict=True):
            t.data = data.to("cpu", torch.float32)
        yield
    finally:
        for t, data in zip(tensors, originals, strict=True):
            t.data = data


def write_policy(policy: torch.nn.Module, target: Path) -> Path:
    """``policy.save_pretrained`` in float32 into ``target``, whole or not at all: refuses
    non-finite weights (NonFiniteWeightsError naming the first), writes a sibling
    ``.<name>.partial`` folder and renames it over ``target`` (a previous export is moved
    to ``.<name>.old`` for the instant between the two renames). The live parameters keep
    their storage and dtype. Parameters must be whole (gathered under ZeRO-3)."""
    target = Path(target)
    problem = _first_non_finite(policy)
    if problem is not None:
        raise NonFiniteWeightsError(f"refusing to export {target}: {problem}; the run "
                                    "diverged (try a lower --learning_rate)")
    partial = target.with_name(f".{target.name}.partial")
    old = target.with_name(f".{target.name}.old")
    remove(partial)
    with _float32_on_cpu(policy):
        policy.save_pretrained(partial)
    remove(old)
    if target.exists():
        os.replace(target, old)
    os.replace(partial, target)
    remove(old)
    return target


def export_policy(engine, out: Path, rank: int, zero_stage: int, folder: str = EXPORT,
                  writer=None) -> Path:
    """The trained policy in ``output_dir/<folder>`` (``writer(policy, target)``, by default
    ``write_policy``, on rank 0, parameters gathered under ZeRO-3); every rank calls it, and
    every rank raises if the export is refused."""
    target = Path(out) / folder
    writer = writer or write_policy
    with _whole_parameters(engine.module, zero_stage == 3):
        on_rank0(rank, lambda: writer(engine.module.policy, target))
    return target
