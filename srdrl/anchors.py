"""Anchor candidates: a trajectory vocabulary clustered from the training labels, scored
beside the policy's samples (``--num_anchors``; docs/DESIGN.md, "The RL loss").

The policy's N samples stay near its own mode: in the noisy-label experiment's target
set, the best-scoring of srdrl_best's candidates (label, samples, trajectory noise) still
drove through the hazard in 28-35% of the scenes with a wrong label (docs/EXPERIMENTS.md,
"Candidate coverage"). Anchors, as in DiffusionDrive's and DiffusionDriveV2's trajectory
vocabularies, put manoeuvres of the whole training set in front of the rewards in every
scene: where a wrong label drives into mud and some anchor swerves around it, the AWR term
can train toward the anchor.

The vocabulary lives in the action space, so an anchor adapts to each scene's speed:

1. every training label is inverted into normalised actions (accel, curvature) x 64
   (``traj_to_action`` with the label's own history);
2. k-means (k-means++ seeding from a fixed seed, then Lloyd's iterations) clusters those
   128-vectors into ``num_anchors`` centres;
3. each step, every scene gets the K anchors rolled out from its own start speed
   (``action_to_traj``); the candidate scored is exactly the one its action produces.

The vocabulary is computed again, identically, when a run resumes (same labels, same seed).
Hand-written k-means: none of the project's dependencies has one for torch tensors (scikit-
learn is not a dependency); it is 30 lines and tested against known clusters.
"""

from __future__ import annotations

import torch

VOCABULARY_SEED = 0
"""Seed of the k-means++ draws: the vocabulary depends on the labels only."""
KMEANS_ITERATIONS = 100
"""Lloyd iterations at most (they stop once no point changes cluster)."""
MAX_LABELS = 4096
"""Labels inverted for the vocabulary at most (an evenly spaced subset beyond it): the
inverse costs a few ms a label on the CPU."""
INVERSE_CHUNK = 64
"""Labels per batched ``traj_to_action`` call (its float64 Jacobians take 128 KB a label)."""


def kmeans(points: torch.Tensor, k: int, seed: int = VOCABULARY_SEED,
           iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Centres (k, D) of ``points`` (M, D): k-means++ seeding with a generator seeded by
    ``seed``, then Lloyd's iterations until no assignment changes. A cluster left empty keeps
    its centre. Deterministic for given points and seed."""
    if points.dim() != 2 or not 1 <= k <= points.shape[0]:
        raise ValueError(f"kmeans needs points (M, D) and 1 <= k <= M; got {tuple(points.shape)}"
                         f" and k={k}")
    x = points.double()
    gen = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(x.shape[0], (1,), generator=gen)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).pow(2).min(dim=1).values
        if d2.sum() <= 0:  # fewer distinct points than k: repeat one
            centres.append(centres[-1])
            continue
        centres.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=gen)].squeeze(0))
    c = torch.stack(centres)
    assign = None
    for _ in range(iterations):
        new = torch.cdist(x, c).argmin(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled, None]
    return c.to(points.dtype)


@torch.no_grad()
def anchor_vocabulary(labels: torch.Tensor, histories: torch.Tensor, action_space, k: int
                      ) -> torch.Tensor:
    """K anchors (k, 64, 2), normalised actions, from labels (M, 64, 3) and their histories
    (M, H, 3): the k-means centres of the labels' actions. At most ``MAX_LABELS`` labels are
    inverted (evenly spaced when there are more)."""
    if labels.shape[0] < k:
        raise ValueError(f"--num_anchors {k} needs at least {k} training labels, "
                         f"got {labels.shape[0]}")
    if labels.shape[0] > MAX_LABELS:
        keep = torch.linspace(0, labels.shape[0] - 1, MAX_LABELS).round().long()
        labels, histories = labels[keep], histories[keep]
    actions = torch.cat([action_space.traj_to_action(labels[i:i + INVERSE_CHUNK].double(),
                                                     histories[i:i + INVERSE_CHUNK].double())
                         for i in range(0, labels.shape[0], INVERSE_CHUNK)])
    return kmeans(actions.flatten(1), k).view(k, *actions.shape[1:]).float()


def records_vocabulary(records: list[dict], action_space, k: int) -> torch.Tensor:
    """``anchor_vocabulary`` of a dataset's records (``JsonlDataset.records``: each with its
    ``trajectory`` and ``ego_history_xyz``)."""
    labels = torch.stack([torch.as_tensor(r["trajectory"], dtype=torch.float64)
                          for r in records])
    histories = torch.stack([torch.as_tensor(r["ego_history_xyz"], dtype=torch.float64)
                             for r in records])
    return anchor_vocabulary(labels, histories, action_space, k)


@torch.no_grad()
def anchor_candidates(anchors: torch.Tensor, history: torch.Tensor, action_space
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors (K, 64, 2) and scene histories (B, H, 3) -> each scene's anchor actions
    (B, K, 64, 2) and their rollouts from the scene's start speed (B, K, 64, 3)."""
    batch, k = history.shape[0], anchors.shape[0]
    actions = anchors.to(history.device, torch.float32)[None].expand(batch, -1, -1, -1)
    v0 = action_space.estimate_v0(history.float())[:, None].expand(batch, k)
    return actions, action_space.action_to_traj(actions, v0).float()
