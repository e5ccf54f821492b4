"""DataLoader pieces of the trainer: VLM inputs built in the workers, resumable order."""

from __future__ import annotations

import signal

from torch.utils.data import Sampler
from torch.utils.data.distributed import DistributedSampler

from srdrl.data.dataset import collate
from srdrl.policy.model import VLM_INPUTS_KEY


class VLMCollate:
    """collate plus the policy's VLM inputs (image preprocessing, tokens), so that the
    DataLoader's worker processes do that CPU work while the GPU runs the previous step."""

    def __init__(self, builder):
        self.builder = builder

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(samples)
        batch[VLM_INPUTS_KEY] = self.builder(batch)
        return batch


class ResumableSampler(Sampler):
    """A DistributedSampler's epoch order from index ``skip`` (the scenes already consumed
    before a resume) up to ``take`` (the scenes of the epoch's whole accumulation windows)."""

    def __init__(self, sampler: DistributedSampler, skip: int, take: int | None = None):
        self.sampler, self.skip = sampler, skip
        self.take = len(sampler) if take is None else min(take, len(sampler))

    def __iter__(self):
        return iter(list(self.sampler)[self.skip:self.take])

    def __len__(self):
        return max(self.take - self.skip, 0)


def ignore_sigint(worker_id: int) -> None:
    """DataLoader worker init: leave Ctrl-C to the main process, which saves a checkpoint
    at the next optimiser step and needs its workers until then."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
