"""Anchor candidates (srdrl/anchors.py): k-means against known clusters, the vocabulary of
labels driven by known actions, and each scene's rollout of the anchors."""

import pytest
import torch

from srdrl.action_space import ActionSpace
from srdrl.anchors import anchor_candidates, anchor_vocabulary, kmeans
from srdrl.data.dataset import straight_history


def test_kmeans_finds_well_separated_clusters_of_odd_sizes():
    gen = torch.Generator().manual_seed(5)
    centres = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [10.0, -3.0, 2.0, 0.0, 1.0],
                            [-4.0, 8.0, -6.0, 5.0, 0.0]])
    sizes = (7, 31, 12)
    points = torch.cat([c + 0.1 * torch.randn(n, 5, generator=gen)
                        for c, n in zip(centres, sizes, strict=True)])
    points = points[torch.randperm(points.shape[0], generator=gen)]
    found = kmeans(points, 3)
    # each true centre has a found centre within the noise's reach, and the found centre is
    # the mean of its cluster's points
    dist = torch.cdist(centres, found)
    assert dist.min(dim=1).values.max() < 0.3  # the mean of 7 noisy points: about 0.1 off
    assign = torch.cdist(points, found).argmin(dim=1)
    for j in range(3):
        assert torch.allclose(found[j], points[assign == j].mean(0), atol=1e-5)
    assert sorted(torch.bincount(assign).tolist()) == sorted(sizes)
    assert torch.equal(found, kmeans(points, 3))  # deterministic for a seed


def test_kmeans_rejects_k_beyond_the_points_and_handles_repeats():
    with pytest.raises(ValueError, match="1 <= k <= M"):
        kmeans(torch.randn(3, 2), 4)
    same = torch.tensor([[1.0, 2.0]] * 4)
    assert torch.equal(kmeans(same, 2), torch.tensor([[1.0, 2.0]] * 2))


def _drive(space, actions, speeds):
    """Labels (M, 64, 3) and histories (M, 16, 3) of actions (M, 64, 2) from those speeds."""
    hist = torch.stack([torch.as_tensor(straight_history(s)) for s in speeds])
    v0 = space.estimate_v0(hist)
    return space.action_to_traj(actions.double(), v0), hist


def test_vocabulary_recovers_the_manoeuvres_that_drove_the_labels():
    space = ActionSpace()
    k = torch.arange(64, dtype=torch.float64)
    swerve = torch.zeros(64, 2, dtype=torch.float64)
    swerve[:, 1] = 0.08 * torch.sin(2 * torch.pi * k / 40) * (k < 40)  # left then right
    brake = torch.zeros(64, 2, dtype=torch.float64)
    brake[:, 0] = -1.5 * (k < 20)
    physical = torch.stack([swerve] * 5 + [brake] * 4)
    labels, hist = _drive(space, space.normalize(physical), [4.0, 5.0, 6.0, 7.0, 8.0,
                                                             5.0, 6.0, 7.0, 8.0])
    anchors = anchor_vocabulary(labels, hist, space, 2)
    assert anchors.shape == (2, 64, 2) and anchors.dtype == torch.float32
    want = space.normalize(torch.stack([swerve, brake])).float()
    order = torch.cdist(want.flatten(1), anchors.flatten(1)).argmin(dim=1)
    assert sorted(order.tolist()) == [0, 1]
    # the inverse smooths the controls a little: compare the rollouts, in metres
    v0 = torch.full((2,), 6.0)
    err = (space.action_to_traj(anchors[order], v0) - space.action_to_traj(want, v0))
    assert err[..., :2].norm(dim=-1).max() < 0.3
    with pytest.raises(ValueError, match="--num_anchors 10 needs at least 10"):
        anchor_vocabulary(labels, hist, space, 10)


def test_anchor_candidates_are_each_scenes_rollout_from_its_own_speed():
    space = ActionSpace()
    anchors = space.normalize(torch.tensor([[0.5, 0.02], [-1.0, -0.05], [0.0, 0.0]])
                              [:, None].expand(3, 64, 2)).float()
    hist = torch.stack([torch.as_tensor(straight_history(s), dtype=torch.float32)
                        for s in (3.0, 9.0)])
    actions, trajs = anchor_candidates(anchors, hist, space)
    assert actions.shape == (2, 3, 64, 2) and trajs.shape == (2, 3, 64, 3)
    assert torch.equal(actions[1], anchors)
    for b, speed in enumerate((3.0, 9.0)):
        want = space.action_to_traj(anchors, torch.full((3,), speed))
        assert torch.allclose(trajs[b], want, atol=1e-3)
    # the straight anchor covers speed x 6.4 s
    assert trajs[:, 2, -1, 0].tolist() == pytest.approx([3.0 * 6.4, 9.0 * 6.4], rel=0.02)


def test_coverage_diagnostic_with_the_label_alone_has_known_answers(tmp_path, monkeypatch):
    """anchor_coverage.py with no policy and no anchors: nothing can beat the label, and
    the best candidate is the label, which crosses a hazard exactly where it is noisy."""
    import json
    import sys
    from pathlib import Path

    from srdrl.data.synthetic import SyntheticDataConfig, make_dataset

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import anchor_coverage

    make_dataset(SyntheticDataConfig(output_dir=str(tmp_path / "d"), num_scenes=13, width=96,
                                     height=64, label_noise=0.5, seed=4), progress=False)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert anchor_coverage.main(["--data", str(tmp_path / "d" / "train.jsonl"),
                                 "--anchors", "0", "3", "--batch", "5"]) == 0
    report = json.loads((tmp_path / "out" / "anchor_coverage.json").read_text())
    alone = report["by_anchors"]["0"]
    assert alone["noisy"]["scenes"] > 0 and alone["clean"]["scenes"] > 0
    assert alone["noisy"]["beaten"] == alone["clean"]["beaten"] == 0.0
    assert alone["noisy"]["best_crosses"] == 1.0 and alone["clean"]["best_crosses"] == 0.0
    three = report["by_anchors"]["3"]
    assert three["noisy"]["scenes"] == alone["noisy"]["scenes"]
    assert 0.0 <= three["noisy"]["beaten"] <= 1.0
