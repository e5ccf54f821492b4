"""Measuring tools shared by the benchmark scripts: CUDA-event timing, the device's copy
bandwidth and bf16 matmul rate (the floors a result is compared with), versions, JSON out.

Use from a script in benchmarks/. Run as ``python benchmarks/bench_x.py``, the script's
folder is ``sys.path[0]`` already; inserting it keeps the import working when the script
is started another way::

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import copy_bandwidth, device_info, time_cuda, write_json  # noqa: E402

API (all timing needs CUDA; only ``time_steps`` falls back to the wall clock, for smoke runs):

``time_cuda(fn, *, iters=100, warmup=10, flush_l2=False) -> Timing``
    Calls ``fn()`` ``warmup`` times, synchronises, then ``iters`` times, each call between
    two CUDA events on the current stream and followed by ``torch.cuda.synchronize()``, so
    a sample is the device time from the call's first launch to its last kernel's end (host
    launch gaps included). ``flush_l2``: zero a 512 MiB buffer before each timed call,
    outside the events, so that the call finds its inputs in HBM, not in L2 (use it when
    the call follows other work in real use).

``Timing``: ``times_s`` (every sample in seconds, in call order), ``median_s``, ``min_s``,
``percentile_s(p)`` (p an int percent, ``statistics.quantiles``' default "exclusive"
interpolation; the one sample when there is one), and ``summary(unit="s", percentiles=(20,
80), include_min=True, include_times=False)``, a dict for JSON such as ``{"median_ms",
"p20_ms", "p80_ms", "min_ms"}`` (+ ``"times_ms"``) for unit "ms" ("s", "ms" or "us").

``copy_bandwidth(nbytes=2 GiB, *, iters=100, warmup=10, flush_l2=False) -> float``
    Bytes per second of a device-to-device ``copy_`` of ``nbytes``, counting the bytes read
    and the bytes written (2 * nbytes) over the median time: the rate a memory-bound kernel
    can at best move its bytes at.

``bf16_matmul_peak(n=8192, *, iters=50, warmup=10) -> float``
    FLOP per second (not TFLOP/s) of an (n, n) @ (n, n) bf16 matmul into a preallocated
    output, 2 n^3 / median time: the rate a compute-bound step can at best reach.

``device_info() -> dict``
    "gpu" (name of the current CUDA device, None without one), "cuda" (the CUDA torch was
    built with), "torch", then "triton", "transformers", "deepspeed", "kornia" for those
    installed, and "python". Versions come from the module when it is already imported,
    else from its package metadata, so asking never imports deepspeed or transformers.

``training_step(engine, batch, num_scenes, timer) -> Callable[[], None]``
    A callable that runs one ``srdrl.engine.train_step`` on ``batch`` with fresh per-scene
    noise on each call (scene numbers counted on), its phases timed by ``timer`` (or by
    the timer passed to the call); what the training-step benchmarks time.

``time_steps(one_step, timer, iters) -> tuple[Timing, list[dict]]``
    Runs ``one_step()`` ``iters`` times (no warm-up) and returns the per-step times (CUDA
    events as ``time_cuda`` with CUDA, else the wall clock: figures for a smoke run only)
    and, per step, ``timer.collect()`` (ms per section of that step).

``count_step_flops(module, one_step, checkpointing=False) -> FlopSections``
    Runs one untimed step under ``srdrl.timing.FlopSections`` with an eager sampler (a CUDA
    graph's replay is invisible to the counter; it runs the same kernels) and, with
    ``checkpointing``, the VLM's gradient checkpointing off (recomputation is not model
    FLOPs). ``one_step(timer)`` must pass the timer to ``train_step``.

``write_json(name, payload) -> Path``
    Writes ``payload`` as indented JSON to ``$OUT/<name>`` (``.json`` appended if missing;
    ``OUT`` defaults to ./bench_out, created if needed) and returns that path.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

L2_FLUSH_BYTES = 512 * 2**20
"""Bytes zeroed before a timed call with ``flush_l2``: ~10x the 50 MB L2 of an H100/H200."""

_UNIT_SCALE = {"s": 1.0, "ms": 1e3, "us": 1e6}


@dataclass(frozen=True)
class Timing:
    """Samples of one timed callable; see :func:`time_cuda`."""

    times_s: tuple[float, ...]
    """Device time of each timed call in seconds, in the order the calls ran."""

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    def percentile_s(self, percent: int) -> float:
        """The ``percent`` (1..99) percentile, interpolated as ``statistics.quantiles``."""
        if not 1 <= percent <= 99:
            raise ValueError(f"percent must be an int in 1..99, got {percent!r}")
        if len(self.times_s) == 1:
            return self.times_s[0]
        return statistics.quantiles(self.times_s, n=100)[percent - 1]

    def summary(self, unit: str = "s", percentiles: tuple[int, ...] = (20, 80), *,
                include_min: bool = True, include_times: bool = False) -> dict:
        """``{"median_<unit>", "p<q>_<unit>" for q in percentiles, "min_<unit>",
        "times_<unit>"}`` (the last two as asked) with values in ``unit``."""
        if unit not in _UNIT_SCALE:
            raise ValueError(f"unit must be one of {tuple(_UNIT_SCALE)}, got {unit!r}")
        scale = _UNIT_SCALE[unit]
        row = {f"median_{unit}": self.median_s * scale}
        for q in percentiles:
            row[f"p{q}_{unit}"] = self.percentile_s(q) * scale
        if include_min:
            row[f"min_{unit}"] = self.min_s * scale
        if include_times:
            row[f"times_{unit}"] = [t * scale for t in self.times_s]
        return row


def time_cuda(fn: Callable[[], object], *, iters: int = 100, warmup: int = 10,
              flush_l2: bool = False) -> Timing:
    """Device time of ``fn()`` per call, from CUDA events; see the module docstring."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    scrub = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if scrub is not None:
            scrub.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)  # elapsed_time is in ms
    return Timing(tuple(times))


def copy_bandwidth(nbytes: int = 2 * 2**30, *, iters: int = 100, warmup: int = 10,
                   flush_l2: bool = False) -> float:
    """Device-to-device copy rate in bytes/s, read + written; see the module docstring."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    timing = time_cuda(lambda: dst.copy_(src), iters=iters, warmup=warmup, flush_l2=flush_l2)
    return 2 * nbytes / timing.median_s


def bf16_matmul_peak(n: int = 8192, *, iters: int = 50, warmup: int = 10) -> float:
    """Measured bf16 matmul rate in FLOP/s for (n, n) @ (n, n); see the module docstring."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    timing = time_cuda(lambda: torch.matmul(a, b, out=c), iters=iters, warmup=warmup)
    return 2 * n**3 / timing.median_s


def _installed_version(package: str) -> str | None:
    module = sys.modules.get(package)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_info() -> dict:
    """GPU name, CUDA, package and Python versions; see the module docstring."""
    info = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cuda": torch.version.cuda, "torch": torch.__version__}
    for package in ("triton", "transformers", "deepspeed", "kornia"):
        version = _installed_version(package)
        if version is not None:
            info[package] = version
    info["python"] = platform.python_version()
    return info


def write_json(name: str, payload) -> Path:
    """Write ``payload`` to $OUT/<name>.json (OUT defaults to ./bench_out); the path."""
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (name if name.endswith(".json") else f"{name}.json")
    path.write_text(json.dumps(payload, indent=2))
    return path


def training_step(engine, batch: dict, num_scenes: int, timer) -> Callable[[], None]:
    """See the module docstring."""
    from srdrl.engine import train_step
    from srdrl.policy.noise import SceneNoise

    calls = [0]

    def step(section_timer=None) -> None:
        i = calls[0]
        calls[0] += 1
        noise = SceneNoise(list(range(i * num_scenes, (i + 1) * num_scenes)))
        train_step(engine, batch, noise, section_timer or timer)

    return step


def time_steps(one_step: Callable[[], None], timer, iters: int) -> tuple[Timing, list[dict]]:
    """Per-step times and per-step section times; see the module docstring."""
    times, sections = [], []
    for _ in range(iters):
        if torch.cuda.is_available():
            times += time_cuda(one_step, iters=1, warmup=0).times_s
        else:
            start = time.perf_counter()
            one_step()
            times.append(time.perf_counter() - start)
        sections.append(timer.collect())
    return Timing(tuple(times)), sections


def count_step_flops(module, one_step: Callable, checkpointing: bool = False):
    """FLOPs of one step, per section; see the module docstring."""
    from dataclasses import replace

    from srdrl.policy.compiled_layers import eager_layers
    from srdrl.policy.kv_recompute import set_vlm_gradient_checkpointing
    from srdrl.timing import FlopSections

    objective = module.objective
    module.objective = replace(objective, use_cuda_graph=False)
    if checkpointing:
        set_vlm_gradient_checkpointing(module.policy, False)
    try:
        # compiled layers (--compile_layers) counted eagerly: the same model FLOPs, and a
        # dispatch mode cannot see inside inductor's kernels
        with FlopSections() as flops, eager_layers():
            one_step(flops)
    finally:
        module.objective = objective
        if checkpointing:
            set_vlm_gradient_checkpointing(module.policy, True)
    return flops
