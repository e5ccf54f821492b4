"""Section timers and FLOP counters for splitting a training step (used by benchmarks;
no-op by default)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch


class NullTimer:
    def section(self, name: str):
        return nullcontext()


NULL_TIMER = NullTimer()


class SectionTimer:
    """Times named sections with CUDA events on GPU (no sync until ``collect``) or the
    wall clock on CPU. Sections of the same name add up."""

    def __init__(self, cuda: bool | None = None):
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self._marks: list[tuple[str, object, object]] = []

    @contextmanager
    def section(self, name: str):
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._marks.append((name, start, end))

    def collect(self) -> dict[str, float]:
        """Milliseconds per section since the last collect."""
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = defaultdict(float)
        for name, start, end in self._marks:
            totals[name] += start.elapsed_time(end) if self.cuda else 1e3 * (end - start)
        self._marks.clear()
        return dict(totals)


class FlopSections:
    """Counts FLOPs per named section of one step with ``FlopCounterMode`` (the matmul-class
    operations torch registers FLOP formulas for: mm, bmm, addmm, convolution, attention;
    elementwise work such as an optimiser update or a Triton kernel counts 0). Use as a
    timer: ``with FlopSections() as flops: step(timer=flops)``; ``per_section`` then holds
    each section's FLOPs (same names add up; sections must not nest) and ``total`` those of
    everything inside."""

    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode

        self.counter = FlopCounterMode(display=False)
        self.per_section: dict[str, int] = defaultdict(int)

    def __enter__(self):
        self.counter.__enter__()
        return self

    def __exit__(self, *exc):
        return self.counter.__exit__(*exc)

    @property
    def total(self) -> int:
        return self.counter.get_total_flops()

    @contextmanager
    def section(self, name: str):
        before = self.total
        yield
        self.per_section[name] += self.total - before


@contextmanager
def _synchronized():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_ops_in_windows(windows: list[tuple[str, float, float]],
                        ops: list[tuple[str, float]], top: int = 5) -> dict:
    """Per section name: the ``top`` host operations ``ops`` (name, start) started inside
    its windows most often, as {"op", "count"}."""
    out = {}
    for name in dict.fromkeys(w[0] for w in windows):
        spans = [(s, e) for n, s, e in windows if n == name]
        counts: dict[str, int] = defaultdict(int)
        for op, start in ops:
            if any(s <= start < e for s, e in spans):
                counts[op] += 1
        out[name] = [{"op": op, "count": c}
                     for op, c in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]
    return out


def kernels_in_windows(windows: list[tuple[str, float, float]],
                       kernels: list[tuple[str, float, float]], top: int = 5) -> dict:
    """Per section name: the device work that started inside its windows.

    ``windows`` are (section, start, end) and ``kernels`` (kernel name, start, end), all in
    one clock (us). Per section: ``wall_ms`` (the windows' summed length), ``launches`` (how
    many kernels, copies and memsets), ``gpu_busy_ms`` (the union of their intervals, so
    overlapping streams count once), ``gpu_idle_fraction`` (1 - busy / wall: the share the
    device waited for the host: launches, syncs, Python) and ``top`` (the ``top`` kernel
    names by summed time, with their ms and count)."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(w[0] for w in windows):
        spans = [(s, e) for n, s, e in windows if n == name]
        inside = sorted((k for k in kernels if any(s <= k[1] < e for s, e in spans)),
                        key=lambda k: k[1])
        busy, reach = 0.0, float("-inf")
        for _, start, end in inside:  # union of intervals, sorted by start
            busy += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        per_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
        for kname, start, end in inside:
            per_name[kname][0] += end - start
            per_name[kname][1] += 1
        wall = sum(e - s for s, e in spans)
        ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
        out[name] = {"wall_ms": wall / 1e3, "launches": len(inside), "gpu_busy_ms": busy / 1e3,
                     "gpu_idle_fraction": 1.0 - busy / wall if wall > 0 else None,
                     "top": [{"kernel": k, "ms": t / 1e3, "count": c}
                             for k, (t, c) in ranked]}
    return out


class KernelSections:
    """Profiles one step's device work per named section with ``torch.profiler``: use as a
    timer (``with KernelSections() as kernels: step(timer=kernels)``), then ``summary()``
    gives ``kernels_in_windows`` of each section.

    Each section synchronises the device on entry and before its end, so the kernels that
    start inside a section's host window are the ones it launched (the backward's, launched
    from autograd's threads, included); the syncs remove the overlap of one section's
    launches with the previous section's kernels, so the walls here are not the step's
    phase times (those come from ``SectionTimer``) but each section's own GPU busy share."""

    PREFIX = "srdrl_section::"

    def __init__(self):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self.profiler = profile(activities=activities)

    def __enter__(self):
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        return self.profiler.__exit__(*exc)

    @contextmanager
    def section(self, name: str):
        from torch.profiler import record_function

        with record_function(self.PREFIX + name), _synchronized():
            yield

    def summary(self, top: int = 5) -> dict:
        """``kernels_in_windows`` per section, with ``host_ops``: the outermost aten
        operators it ran most often (``host_ops_in_windows``; the backward's included), and
        ``host_launches``: the host's launch, copy and memset calls to the CUDA runtime or
        driver (one CUDA-graph replay is one call, however many kernels it holds)."""
        from torch.autograd import DeviceType

        windows, kernels, ops, calls = [], [], [], []
        for event in self.profiler.events():
            if event.device_type == DeviceType.CPU:
                if event.name.startswith(self.PREFIX):
                    windows.append((event.name[len(self.PREFIX):], event.time_range.start,
                                    event.time_range.end))
                elif event.name.startswith("aten::") and not _inside_aten(event):
                    ops.append((event.name, event.time_range.start))
                elif event.name.startswith("cu") and any(
                        w in event.name for w in ("Launch", "Memcpy", "Memset")):
                    calls.append(("launch", event.time_range.start))  # one per host call
            elif not event.is_user_annotation:
                kernels.append((event.name, event.time_range.start, event.time_range.end))
        out = kernels_in_windows(windows, kernels, top)
        for name, host_ops in host_ops_in_windows(windows, ops, top).items():
            out[name]["host_ops"] = host_ops
        for name, launches in host_ops_in_windows(windows, calls, 1).items():
            out[name]["host_launches"] = launches[0]["count"] if launches else 0
        return out


def _inside_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False
