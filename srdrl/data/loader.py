"""DataLoader pieces of the trainer: VLM inputs built in the workers, resumable order."""

from __future__ import annotations

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
    """A DistributedSampler's epoch order, started after the batches already consumed."""

    def __init__(self, sampler: DistributedSampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return iter(list(self.sampler)[self.skip:])

    def __len__(self):
        return max(len(self.sampler) - self.skip, 0)
