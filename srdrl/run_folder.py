"""An output folder that many ranks share: decisions the ranks agree on, files written
whole (temporary file, then rename), and the check that a folder can take a new run
(docs/DESIGN.md, "Checkpoints"). Used by srdrl.checkpoint and srdrl.train."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from srdrl.errors import UserError

CHECKPOINTS = "checkpoints"
EXPORT = "policy"
TRAIN_CONFIG = "train_config.json"
RUN_OUTPUTS = (CHECKPOINTS, "metrics.jsonl", EXPORT, "eval_report.json", TRAIN_CONFIG,
               "tensorboard")
"""What a training run writes into output_dir (data/ aside): the signs of a used folder."""


class CheckpointError(UserError):
    """A checkpoint or output folder that cannot be used; the message names it and why."""


# --------------------------------------------------------------------------- ranks agree


def agree(error: str | None) -> str | None:
    """The first failing rank's message on every rank, or None when every rank succeeded.
    Also a barrier. Without a process group, ``error`` itself."""
    if not torch.distributed.is_initialized():
        return error
    device = (torch.device("cuda", torch.cuda.current_device())
              if torch.distributed.get_backend() == "nccl" else torch.device("cpu"))
    ok = torch.tensor([int(error is None)], device=device)
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if ok.item():
        return None
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    return next(e if len(errors) == 1 else f"rank {r}: {e}"
                for r, e in enumerate(errors) if e is not None)


def all_or_none(action: Callable[[], object]) -> None:
    """Run ``action`` on this rank; if it fails on any rank, every rank raises: the failing
    rank its own exception (with its traceback), the others a CheckpointError with the
    failing rank's message. Also a barrier."""
    failure = None
    try:
        action()
    except Exception as e:  # noqa: BLE001 - re-raised below, once the ranks agree
        failure = e
    message = agree(None if failure is None else describe(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise CheckpointError(message)


def on_rank0(rank: int, action: Callable[[], object]) -> None:
    all_or_none(action if rank == 0 else (lambda: None))


def describe(error: BaseException) -> str:
    """One line: the refused pickle global when there is one, else the first line."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()] or [type(error).__name__]
    line = next((x for x in lines if "Unsupported global" in x), lines[0])
    return f"{type(error).__name__}: {line[:300]}"


# --------------------------------------------------------------------------- files


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    """Strict JSON (no NaN/Infinity tokens) written to a temporary file, then renamed over
    ``path``: a reader sees the old file or the new one, never half of it."""
    write_atomic(Path(path), json.dumps(value, indent=2, sort_keys=True, allow_nan=False))


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _holds_something(path: Path) -> bool:
    """A file, a link, or a folder that is not empty (the probe below leaves an empty
    checkpoints/ behind, which must not make the folder count as used)."""
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def _probe_writable(folder: Path, rank: int) -> str | None:
    """None when ``folder`` can be created and written, else why not."""
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    probe = folder / f".write_probe_rank{rank}_{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"srdrl")
        probe.unlink()
    except OSError as e:
        return f"{folder} cannot be written ({e.strerror or e})"
    return None


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool, rank: int) -> None:
    """Refuse an output_dir that holds a run (any of ``RUN_OUTPUTS``; empty folders do not
    count) unless ``resume`` or ``overwrite``; with ``overwrite`` and not ``resume``, rank 0
    removes those (data/, the generated synthetic data, and anything else stays). Then every
    rank writes and removes a probe file in output_dir and output_dir/checkpoints, so an
    unwritable folder fails now rather than at the first save. Raises CheckpointError naming
    the path."""
    out = Path(out)
    used = [name for name in RUN_OUTPUTS if _holds_something(out / name)]
    refused = None
    if used and not (resume or overwrite):
        refused = (f"output_dir {out} already holds a run ({', '.join(used)}); pass --resume "
                   f"to continue it or --overwrite_output_dir to replace it (data/ is kept)")
    # every rank looks before any rank probes or removes (a probe is a file in checkpoints/)
    refused = agree(refused)
    if refused is not None:
        raise CheckpointError(refused)
    if used and overwrite and not resume:
        def remove_run():
            for name in used:
                remove(out / name)
        try:
            on_rank0(rank, remove_run)
        except OSError as e:
            raise CheckpointError(f"--overwrite_output_dir: cannot remove {e.filename}: "
                                  f"{e.strerror}") from None
    problem = _probe_writable(out, rank) or _probe_writable(out / CHECKPOINTS, rank)
    problem = agree(problem)
    if problem is not None:
        raise CheckpointError(f"output_dir: {problem}; checkpoints and metrics go there")
