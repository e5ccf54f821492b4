"""Training state on disk: DeepSpeed checkpoints with each rank's RNG, and the exported policy.

Layout under ``output_dir``: ``checkpoints/step<N>/`` (DeepSpeed's files plus
``rng_rank<r>.pt``) with ``checkpoints/latest`` naming the newest complete one, and
``policy/`` (the final policy, ``save_pretrained``). DeepSpeed writes ``latest`` last, so a
checkpoint it names is complete (docs/DESIGN.md, "Checkpoints"). The training noise itself
is keyed by (seed, epoch, scene), so only the generic RNGs need saving.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
EXPORT = "policy"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, out: Path, progress: dict, rank: int) -> None:
    """DeepSpeed's own save, after each rank's RNG went into the tag folder."""
    tag = f"step{progress['global_step']}"
    folder = out / CHECKPOINTS / tag
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"rng_rank{rank}.pt.tmp"
    torch.save(rng_state(), tmp)
    os.replace(tmp, folder / f"rng_rank{rank}.pt")
    torch.distributed.barrier()
    engine.save_checkpoint(str(out / CHECKPOINTS), tag=tag, client_state=progress)


def load_checkpoint(engine, out: Path, rank: int) -> dict | None:
    """The progress dict of the checkpoint ``latest`` names (engine and RNG restored), or
    None when there is none."""
    if not (out / CHECKPOINTS / "latest").is_file():
        return None
    tag = (out / CHECKPOINTS / "latest").read_text().strip()
    path, progress = engine.load_checkpoint(str(out / CHECKPOINTS), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {tag} from {out / CHECKPOINTS}")
    set_rng_state(torch.load(out / CHECKPOINTS / tag / f"rng_rank{rank}.pt", weights_only=False))
    return progress


def export_policy(engine, out: Path, rank: int, zero_stage: int) -> Path:
    """The trained policy as safetensors (save_pretrained), gathered under ZeRO-3."""
    import deepspeed

    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
              if zero_stage == 3 else contextlib.nullcontext())
    with gather:
        if rank == 0:
            policy = engine.module.policy
            dtype = next(policy.parameters()).dtype
            policy.float().save_pretrained(out / EXPORT)
            policy.to(dtype)
    torch.distributed.barrier()
    return out / EXPORT
