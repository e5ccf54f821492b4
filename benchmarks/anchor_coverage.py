"""Diagnostic: how often the RL candidates can beat a training label, with and without
anchors (``--num_anchors``; srdrl/anchors.py). No training: one pass over a training file.

Per scene the candidates are those a fine-tuning step scores: the label, the policy's N
samples (with ``--policy``: a policy folder, sampled from the dataset's reasoning; with
``--candidate_noise trajectory`` moved as in training) and K anchors (the k-means centres
of this file's labels' actions, rolled out from the scene's speed). They are scored with
the training rewards. For each K the report gives, split by the data's ``label_noisy``
flag (a diagnostic only, as in the gate diagnostics; nothing here is chosen with it):

- beaten: some candidate out-scores the label (what makes the AWR term train away from
  it and, with ``--lower_traj_weight_when_beaten``, lowers the label's weight);
- best_crosses: the best-scoring candidate (the label included) drives through a hazard
  (``crosses_any_hazard``, the evaluation's own test): on noisy labels, lower is a fix
  within reach of the AWR term; on clean labels, higher is harm.

    python benchmarks/anchor_coverage.py --data runs/exp/data/target0.3/train.jsonl \\
        --policy runs/exp/runs/base_seed0/policy --samples 4 --candidate_noise trajectory \\
        --anchors 0 8 16 32 --limit 300

Writes $OUT/anchor_coverage.json (OUT defaults to ./bench_out) and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from srdrl.anchors import anchor_candidates, records_vocabulary  # noqa: E402
from srdrl.config import ObjectiveConfig, RewardConfig  # noqa: E402
from srdrl.data.dataset import JsonlDataset, collate, scored_images  # noqa: E402
from srdrl.eval_metrics import crosses_any_hazard  # noqa: E402
from srdrl.exploration import trajectory_noise  # noqa: E402
from srdrl.objective import label_beaten  # noqa: E402
from srdrl.rewards import score_candidates  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a training JSONL with label_noisy flags")
    p.add_argument("--policy", default=None, help="a policy folder (save_pretrained)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--candidate_noise", choices=["none", "trajectory"], default="none")
    p.add_argument("--anchors", type=int, nargs="+", default=[0, 8, 16, 32])
    p.add_argument("--limit", type=int, default=None, help="first scenes of the file only")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scoring_backend", default="kornia")
    return p.parse_args(argv)


@torch.no_grad()
def policy_candidates(policy, batch, args, generator):
    """The policy's N samples (B, N, 64, 2|3), moved by trajectory noise if asked."""
    from srdrl.policy import sample_trajectories

    cfg = ObjectiveConfig(num_trajectory_samples=args.samples)
    actions, trajs = sample_trajectories(policy, batch, args.samples, steps=cfg.flow_steps,
                                         noise_scale_step=cfg.noise_scale_step,
                                         generator=generator, use_cuda_graph=False)
    if args.candidate_noise == "trajectory":
        actions, trajs = trajectory_noise(actions, trajs, batch["ego_history_xyz"],
                                          policy.action_space, cfg.candidate_scale_std,
                                          cfg.candidate_offset_std, generator)
    return trajs


def summarise(beaten, best_crosses, noisy) -> dict:
    out = {}
    for name, mask in (("noisy", noisy), ("clean", ~noisy)):
        out[name] = {"scenes": int(mask.sum()),
                     "beaten": float(beaten[mask].mean()) if mask.any() else None,
                     "best_crosses": float(best_crosses[mask].mean()) if mask.any() else None}
    return out


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    dataset = JsonlDataset(Path(args.data))
    records = dataset.records[:args.limit] if args.limit else dataset.records
    noisy = np.array([bool(r["eval"].get("label_noisy")) for r in records])
    from srdrl.action_space import ActionSpace
    space = ActionSpace()
    vocab = {k: records_vocabulary(dataset.records, space, k) for k in args.anchors if k}
    policy = None
    if args.policy:
        from srdrl.policy import VLAPolicy
        policy = VLAPolicy.from_pretrained(args.policy, device="cpu").eval()
    rewards = RewardConfig(scoring_backend=args.scoring_backend)
    beaten = {k: [] for k in args.anchors}
    crosses = {k: [] for k in args.anchors}
    generator = torch.Generator().manual_seed(args.seed)
    for start in tqdm(range(0, len(records), args.batch), desc="scenes", unit="batch"):
        idx = list(range(start, min(start + args.batch, len(records))))
        batch = collate([dataset[i] for i in idx])
        label = batch["trajectory"].float()
        history = batch["ego_history_xyz"].float()
        own = [label[:, None]]
        if policy is not None:
            own.append(policy_candidates(policy, batch, args, generator).float())
        for k in args.anchors:
            cands = list(own)
            if k:
                cands.append(anchor_candidates(vocab[k], history, space)[1])
            cands = torch.cat(cands, dim=1)  # (B, C, 64, 3), label first
            terms = score_candidates(scored_images(batch), cands, label, history, batch["K"],
                                     batch["T_cam_from_ego"], list(batch["reasoning_text"]),
                                     rewards)
            r = terms.reward
            beaten[k] += label_beaten(r).tolist()
            best = r.argmax(dim=1)
            for b, i in enumerate(idx):
                path = cands[b, best[b]].numpy()
                crosses[k].append(crosses_any_hazard(path, records[i]["eval"]["hazards"]))
    results = {"data": str(args.data), "scenes": len(records), "policy": args.policy,
               "samples": args.samples if args.policy else 0,
               "candidate_noise": args.candidate_noise,
               "by_anchors": {str(k): summarise(np.array(beaten[k]), np.array(crosses[k]),
                                                noisy) for k in args.anchors}}
    path = write_json("anchor_coverage", results)
    print(f"{len(records)} scenes ({int(noisy.sum())} noisy labels); policy {args.policy}, "
          f"{results['samples']} samples, noise {args.candidate_noise}")
    print(f"{'anchors':>7} {'beaten|noisy':>13} {'beaten|clean':>13} "
          f"{'best crosses|noisy':>19} {'best crosses|clean':>19}")
    for k, row in results["by_anchors"].items():
        n, c = row["noisy"], row["clean"]
        print(f"{k:>7} {n['beaten']:>13.3f} {c['beaten']:>13.3f} {n['best_crosses']:>19.3f} "
              f"{c['best_crosses']:>19.3f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
