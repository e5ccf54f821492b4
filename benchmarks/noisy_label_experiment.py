"""The noisy-label experiment: does SRD-RL beat plain supervised fine-tuning?

Same generator, scenes, policy size, steps and seeds for every arm. Label noise 0%, 10%,
30% (the same scenes at every level: the generator's seed is fixed, only labels change);
arms ``sft`` (``--rl_loss_weight 0``) and ``srdrl``; ablations at 30%: without the trust
gate, without visual safety, without reasoning alignment, AWR ``all`` instead of ``best``,
and the trust-gated supervised loss. Each run is ``python -m srdrl.train`` (its final
evaluation writes ``eval_report.json``); runs go in parallel, one process each.

    python benchmarks/noisy_label_experiment.py --out runs/exp --steps 600 --seeds 0 1 2
    python benchmarks/noisy_label_experiment.py --out runs/exp --steps 1000 \
        --pretrained 'pre/noise{noise}/policy'     # arms start from a supervised policy

Writes OUT/results.json (every run's report and the trust-gate diagnostics per noise
level) and OUT/table.md (mean and spread over seeds), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ARMS = {
    "sft": ["--rl_loss_weight", "0"],
    "srdrl": [],
    "srdrl_no_gate": ["--no_use_trust_gate"],
    "srdrl_no_safety": ["--safety_reward_weight", "0"],
    "srdrl_no_reasoning": ["--reasoning_reward_weight", "0"],
    "srdrl_awr_all": ["--awr_mode", "all"],
    "srdrl_gated_sft": ["--gate_supervised_loss"],
    # remedy: the design's unsafe threshold (0.3) never fires on this data, where noisy
    # labels' path safety averages 0.57 and clean ones' 0.83 at 30% noise; 0.7 sits between
    # (the gate diagnostics' in-sample best-F1 threshold there: 0.68)
    "srdrl_gate07": ["--unsafe_threshold", "0.7"],
    "srdrl_gate07_gated_sft": ["--unsafe_threshold", "0.7", "--gate_supervised_loss"],
    # remedy: more RL signal: 8 samples per scene and rl_loss_weight 2 on top of the above
    "srdrl_gate07_gated_sft_rl2_n8": ["--unsafe_threshold", "0.7", "--gate_supervised_loss",
                                      "--rl_loss_weight", "2", "--num_trajectory_samples", "8"],
    "srdrl_gate07_gated_sft_rl4_n16": ["--unsafe_threshold", "0.7", "--gate_supervised_loss",
                                       "--rl_loss_weight", "4", "--num_trajectory_samples", "16"],
    # ... and a stronger say for the reasoning (its ablation changed nothing at weight 0.3)
    "srdrl_gate07_gated_sft_rl2_n8_reason1": [
        "--unsafe_threshold", "0.7", "--gate_supervised_loss", "--rl_loss_weight", "2",
        "--num_trajectory_samples", "8", "--reasoning_reward_weight", "1.0"],
}
MAIN_ARMS = ("sft", "srdrl")
METRICS = ("hazard_crossing_rate", "hazard_crossing_rate_in_path_scenes", "ade",
           "ade_hazard_free", "min_ade", "reasoning_alignment_rate",
           "noisy_label_left_behind_rate", "train_gt_is_best", "train_gate_fired")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    p.add_argument("--ablation-noise", type=float, default=0.3)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--scenes", type=int, default=440, help="generated scenes (10%% validation)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="supervised steps on the same (noisy) training set before every arm, "
                        "one pretraining per noise level and seed; every arm then starts from "
                        "it (--policy DIR), so each arm's budget is pretrain + --steps")
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--pretrained", default=None,
                   help="start every arm from this local policy instead of pretraining here; "
                        "'{noise}' in it is replaced by the noise level (e.g. "
                        "runs/pre{noise}/policy): one shared pretraining per noise level")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: tabulate the reports already under OUT/runs (runs "
                        "made by several calls, e.g. on different machines, merged there)")
    p.add_argument("--pretrain-only", action="store_true",
                   help="stop after pretraining (its runs are reused by a later call)")
    p.add_argument("--parallel", type=int, default=2, help="concurrent training processes")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="flags passed to every srdrl.train run")
    return p.parse_args(argv)


def make_data(out: Path, noise: float, scenes: int) -> Path:
    from srdrl.data.synthetic import SyntheticDataConfig, make_dataset

    root = out / f"data_noise{noise:g}"
    if not (root / "val.jsonl").is_file():
        make_dataset(SyntheticDataConfig(output_dir=str(root), num_scenes=scenes,
                                         label_noise=noise, seed=0), progress=False)
    return root


def train_run(args, run_dir: Path, data: Path, steps: int, seed: int, flags: list[str],
              batch: int) -> dict:
    """One ``python -m srdrl.train`` process (skipped when its report exists); its report."""
    report = run_dir / "eval_report.json"
    if not report.is_file() and args.collect:
        return {"error": "missing"}
    if not report.is_file():
        cmd = [sys.executable, "-m", "srdrl.train", "--data_path", str(data / "train.jsonl"),
               "--output_dir", str(run_dir), "--max_steps", str(steps), "--seed", str(seed),
               "--per_device_train_batch_size", str(batch), "--logging_steps", "50",
               "--dataloader_workers", "1", *flags, *args.extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        start = time.time()
        with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0:
            return {"error": done.returncode}
        print(f"  done {run_dir.name} in {time.time() - start:.0f} s", flush=True)
    report = json.loads(report.read_text())
    # srdrl-eval nests metrics under their reasoning mode: read the headline's (generated)
    report.update(report.get("modes", {}).get(report.get("headline_mode"), {}))
    report.update(training_tail(run_dir / "metrics.jsonl"))
    return {"report": report}


TRAINING_METRICS = ("gt_is_best", "gate_fired", "reasoning", "safety")


def training_tail(path: Path, last: int = 5) -> dict:
    """Mean of the last ``last`` logged values of the SRD-RL step metrics (``train_*``)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "gt_is_best" in r][-last:]
    return {f"train_{k}": float(np.mean([r[k] for r in rows])) for k in TRAINING_METRICS
            if rows and k in rows[0]}


def pretrained_dir(out: Path, noise: float, seed: int) -> Path:
    return out / "runs" / f"pretrain_noise{noise:g}_seed{seed}"


def pretrain(args, out: Path, data: Path, noise: float, seed: int) -> dict:
    """Supervised pretraining shared by every arm of this noise level and seed."""
    result = train_run(args, pretrained_dir(out, noise, seed), data, args.pretrain_steps, seed,
                       [*ARMS["sft"], "--learning_rate", str(args.pretrain_lr)],
                       args.pretrain_batch)
    return {"arm": "pretrain", "noise": noise, "seed": seed, **result}


def run_one(args, out: Path, data: Path, arm: str, noise: float, seed: int) -> dict:
    flags = list(ARMS[arm])
    if args.pretrained:
        flags += ["--policy", args.pretrained.replace("{noise}", f"{noise:g}")]
    elif args.pretrain_steps > 0:
        flags += ["--policy", str(pretrained_dir(out, noise, seed) / "policy")]
    result = train_run(args, out / "runs" / f"{arm}_noise{noise:g}_seed{seed}", data,
                       args.steps, seed, flags, args.batch)
    return {"arm": arm, "noise": noise, "seed": seed, **result}


def table(rows: list[dict], gates: dict) -> str:
    lines = ["| arm | noise | seeds | " + " | ".join(METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    groups: dict[tuple, list] = {}
    for r in rows:
        if "report" in r:
            groups.setdefault((r["arm"], r["noise"]), []).append(r["report"])
    for (arm, noise), reports in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = []
        for m in METRICS:
            vals = np.array([rep[m] for rep in reports if rep.get(m) is not None], float)
            cells.append(f"{vals.mean():.3f} ± {vals.std():.3f}" if len(vals) else "n/a")
        lines.append(f"| {arm} | {noise:g} | {len(reports)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Trust gate on the training labels (no policy involved):")
    lines.append("")
    lines.append("| noise | noisy labels | gate precision | gate recall | label safety noisy / "
                 "clean (mean) | AUROC of 1 - safety | best-F1 unsafe threshold (diagnostic) |")
    lines.append("|---|---|---|---|---|---|---|")
    for noise, g in sorted(gates.items()):
        lines.append(
            f"| {noise:g} | {g.get('noisy_labels')} | {_f(g.get('precision'))} | "
            f"{_f(g.get('recall'))} | {_f(g.get('label_safety_noisy_mean'))} / "
            f"{_f(g.get('label_safety_clean_mean'))} | {_f(g.get('auroc_one_minus_safety'))} | "
            f"{_f(g.get('diagnostic_best_f1_unsafe_threshold_unsafe_threshold'))} |")
    return "\n".join(lines)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def gate_summary(data: Path) -> dict:
    from srdrl.config import RewardConfig
    from srdrl.data.dataset import JsonlDataset
    from srdrl.evaluate import gate_diagnostics

    d = gate_diagnostics(JsonlDataset(data / "train.jsonl"),
                         RewardConfig(scoring_backend="kornia"))
    flat = {}
    for k, v in d.items():  # keep the scalar figures, whatever their nesting
        if isinstance(v, dict):
            flat.update({f"{k}_{kk}": vv for kk, vv in v.items()
                         if not isinstance(vv, (dict, list))})
        elif not isinstance(v, list):
            flat[k] = v
    return flat


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pretrained and args.pretrain_steps > 0:
        raise SystemExit("give --pretrained or --pretrain-steps, not both")
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    levels = sorted(set(args.noise) | {args.ablation_noise})
    with ThreadPoolExecutor(len(levels)) as pool:  # the generator runs in this process
        data = dict(zip(levels, pool.map(lambda n: make_data(out, n, args.scenes), levels),
                        strict=True))
    jobs = []
    for noise in args.noise:
        for arm in args.arms:
            if arm in MAIN_ARMS or noise == args.ablation_noise:
                jobs += [(arm, noise, s) for s in args.seeds]
    pretrain_rows = []
    if args.pretrain_steps > 0:
        cells = sorted({(noise, seed) for _, noise, seed in jobs})
        print(f"{len(cells)} supervised pretraining runs of {args.pretrain_steps} steps",
              flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            pretrain_rows = list(pool.map(lambda c: pretrain(args, out, data[c[0]], *c), cells))
        if any("error" in r for r in pretrain_rows):
            print(f"pretraining failed: {[r for r in pretrain_rows if 'error' in r]}")
            return 1
        if args.pretrain_only:
            jobs = []
    print(f"{len(jobs)} runs, {args.parallel} at a time, {args.steps} steps each", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda j: run_one(args, out, data[j[1]], *j), jobs))
    rows = pretrain_rows + rows
    gates = {}
    for n in args.noise:
        try:
            gates[n] = gate_summary(data[n])
        except Exception as e:  # a level without noisy labels has no precision to give
            gates[n] = {"error": str(e)}
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": rows,
                                                  "gate": gates}, indent=2, default=str))
    text = table(rows, gates)
    (out / "table.md").write_text(text + "\n")
    print(text)
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} runs failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
