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
