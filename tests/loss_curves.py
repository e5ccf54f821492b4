"""Training two copies of a policy side by side, for the tests of the fast paths
(--liger_kernels, --compile_layers) against the plain one."""

import torch

from srdrl.config import ObjectiveConfig, RewardConfig
from srdrl.data.dataset import JsonlDataset, collate
from srdrl.objective import ConsistencyHeads, srdrl_loss


def train_losses(policy, data, steps: int, cfg: ObjectiveConfig) -> list[float]:
    """The losses of ``steps`` AdamW steps of ``policy`` (and fresh consistency heads, seeded
    the same every call) on batches of 4 scenes of ``data``, in the policy's device and
    dtype; the sampling noise of step i is seeded with i."""
    ds = JsonlDataset(data)
    torch.manual_seed(1)
    heads = ConsistencyHeads.for_policy(policy).to(policy.device, next(policy.parameters()).dtype)
    opt = torch.optim.AdamW([*policy.parameters(), *heads.parameters()], lr=3e-4)
    losses = []
    for step in range(steps):
        batch = collate([ds[(4 * step + i) % len(ds)] for i in range(4)])
        loss, _ = srdrl_loss(policy, heads, batch, cfg, RewardConfig(),
                             generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_trains_like(fast: list[float], plain: list[float]) -> None:
    """A bf16 fast path against the plain one over the same steps: finite, the plain run
    trains (its last 5 losses 5% below its first: not a comparison of noise), every loss
    within 3% (bf16 rounds to 2^-8; differently rounded updates drift a little) and the
    first, from the same weights, within 1%."""
    fast_l, plain_l = torch.tensor(fast), torch.tensor(plain)
    assert torch.isfinite(fast_l).all(), fast
    assert plain_l[-5:].mean() < 0.95 * plain_l[0], plain
    rel = ((fast_l - plain_l).abs() / plain_l.abs()).max().item()
    assert rel < 0.03, (plain, fast, rel)
    assert abs(fast_l[0] - plain_l[0]) / plain_l[0] < 0.01, (plain, fast)
