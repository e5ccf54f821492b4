"""Per-scene random noise that does not depend on how a batch is split.

A ``SceneNoise`` holds one generator per scene, seeded from the scene's identity (for
training: the run's seed, the epoch and the scene's index in the dataset). Every draw of
a scene-major tensor (dim 0 = scenes x rows per scene) takes each scene's rows from that
scene's own generator, so a scene gets the same noise on one process or on any rank of
many, in any micro-batch, and after a resume. That is what lets losses of a multi-rank
run equal a single-process run at the same global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def scene_seed(*key: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, epoch, scene index)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


class SceneNoise:
    def __init__(self, seeds: Sequence[int]):
        if len(seeds) == 0:
            raise ValueError("SceneNoise needs at least one seed")
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def draw(self, sampler, shape, device) -> torch.Tensor:
        """``sampler`` (torch.randn / torch.rand) of ``shape``, scene-major on dim 0."""
        scenes = len(self.generators)
        if shape[0] % scenes:
            raise ValueError(f"cannot split {shape[0]} rows over {scenes} scenes")
        rows = shape[0] // scenes
        parts = [sampler((rows, *shape[1:]), generator=g, dtype=torch.float32)
                 for g in self.generators]
        return torch.cat(parts).to(device)
