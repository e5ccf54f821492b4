"""The noisy-label experiment, source -> target (docs/EXPERIMENTS.md).

1. Data (``srdrl-make-data``, one generator seed per set): a clean source set; the target
   set at each label-noise level (one seed: the same scenes, only labels change), whose
   train.jsonl is fine-tuned on and whose val.jsonl is the validation split; a separate
   test set (its own seed), evaluated once at the end.
2. A base policy per base seed, trained supervised on the clean source labels.
3. Every arm fine-tunes each base on the noisy target set for the same steps and batch
   (the same label passes); the fine-tuning seed differs from the base seed.
4. Validation (``srdrl-eval``, generated reasoning, oracle as a diagnostic) picks the best
   configuration among the ``srdrl_best`` variants; its one-part-removed ablations are run
   after the choice. Nothing is chosen with ``label_noisy`` or on test data.
5. Test, once: every final arm, every base seed, every evaluation seed; paired bootstrap
   confidence intervals of crossing-rate ratios against ``supervised`` over the same scenes.

    python benchmarks/noisy_label_experiment.py --out runs/exp --scale smoke --device cpu
    python benchmarks/noisy_label_experiment.py --out runs/exp --scale session --device cuda \
        --jobs 12
    python benchmarks/noisy_label_experiment.py --out runs/exp --scale full --device cuda \
        --jobs 12

Finished steps are skipped on a rerun (a policy's weights or a report already there; a
fine-tuning chain whose last test evaluation is there is skipped whole, so its policy need
not be kept), so a run cut short by a time limit continues where it stopped. Writes
OUT/results.json and OUT/table.md. Scales: ``smoke`` (checks the pipeline), ``session``
(one GPU, about half an hour: arms fixed in advance, no validation stage),
``session_choice`` (the session scale with srdrl_best chosen on validation among three
candidates, tested on a fresh test set, noise 0, 0.1 and 0.3; about five 9-minute calls),
``full``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment_table import (  # noqa: E402
    TABLE_METRICS,
    eval_dir,
    mean_present,
    read_eval,
    report,
    run_name,
)

# the parts of the method: (flags that turn the part on, flags of the run without it)
PARTS = {
    "trajectory_noise": (["--candidate_noise", "trajectory"], []),
    "label_baseline": (["--awr_baseline", "label"], []),
    "lower_sup_when_beaten": (["--lower_traj_weight_when_beaten"], []),
    "relative_gate": (["--trust_gate_mode", "relative", "--gate_supervised_loss"],
                      ["--no_use_trust_gate"]),
    "generated_reasoning": (["--rollout_reasoning", "generated"], []),
}
# what srdrl_best does not have, each tried on top of it (an arm "srdrl_best_<name>")
ADDITIONS = {"srdrl_best_anchors": ["--num_anchors", "16"]}
SCALES = {
    "smoke": dict(noise=[0.3], base_seeds=[0], eval_seeds=[0], source=16, target=16, val=6,
                  test=10, width=128, height=96, base_steps=3, base_batch=2, base_lr=1e-3,
                  steps=2, batch=2, lr=3e-4, eval_samples=2, variants=["v1"], resamples=200,
                  min_test_in_path=0),
    # what one GPU does in four 10-minute calls (--arms splits them): the tiny preset's own
    # image size, arms fixed in advance (no variant to choose, so no validation stage), every
    # one-part-removed ablation, supervised at noise 0 as the clean reference
    "session": dict(noise=[0.0, 0.3], base_seeds=[0, 1, 2], eval_seeds=[0, 1], source=2000,
                    target=1000, val=200, test=600, width=320, height=192, base_steps=800,
                    base_batch=16, base_lr=2e-3, steps=250, batch=16, lr=1e-3,
                    eval_samples=4, variants=["v1"], resamples=4000, min_test_in_path=300,
                    arm_levels={"supervised": [0.0, 0.3], "srdrl_seed": [0.3],
                                "srdrl_best": [0.3],
                                **{f"without_{p}": [0.3] for p in PARTS},
                                **{a: [0.3] for a in ADDITIONS}}),
    "full": dict(noise=[0.0, 0.1, 0.3], base_seeds=[0, 1, 2], eval_seeds=[0, 1, 2],
                 source=2000, target=1000, val=200, test=600, width=640, height=384,
                 base_steps=6000, base_batch=4, base_lr=1e-3, steps=1000, batch=4, lr=3e-4,
                 eval_samples=4, variants=["v1", "v2"], resamples=4000, min_test_in_path=300),
}
# the session scale's arms, with srdrl_best chosen on validation among candidates taken
# from that scale's table, and a test set of a generator seed no run has been tested on
# (noise 0 and 0.1 too: the table); once chosen, srdrl_best is also fine-tuned
# at ``best_levels``
SCALES["session_choice"] = dict(
    SCALES["session"], noise=[0.0, 0.1, 0.3],
    variants=["v1", "anchors", "anchors_without_label_baseline"], data_seeds={"test": 404},
    arm_levels={"supervised": [0.0, 0.1, 0.3], "srdrl_seed": [0.0, 0.1, 0.3]},
    best_levels=[0.0, 0.1])
DATA_SEEDS = {"source": 101, "target": 202, "test": 303}
"""Generator seeds of the data sets; a scale's ``data_seeds`` overrides them."""
TRAIN_PICTURES = 8
"""Scenes drawn from the first base's evaluation on its own (noisy) training scenes."""
ABLATION_NOISE = 0.3
FIXED_ARMS = {"supervised": ["--rl_loss_weight", "0"], "srdrl_seed": []}
# configurations of srdrl_best tried on validation at ABLATION_NOISE: (parts left out,
# flags added). The anchors variants come from the session scale's table (docs/
# EXPERIMENTS.md): anchors helped, the label-relative advantage hurt; choosing them from
# that table would be choosing on its test split, so they compete on validation instead.
VARIANTS = {"v1": ((), []),
            "v2": ((), ["--rl_loss_weight", "2", "--num_trajectory_samples", "8"]),
            "anchors": ((), ["--num_anchors", "16"]),
            "anchors_without_label_baseline": (("label_baseline",), ["--num_anchors", "16"])}


def best_flags(variant: str, without: str | None = None) -> list[str]:
    """Flags of srdrl_best in ``variant``, optionally with one more part removed."""
    removed, extra = VARIANTS[variant]
    flags = []
    for name, (on, off) in PARTS.items():
        flags += off if name == without or name in removed else on
    return flags + extra


def ablations(variant: str) -> dict[str, list[str]]:
    """``without_<part>`` arms of ``variant``: each part it has, removed in turn."""
    return {f"without_{p}": best_flags(variant, without=p) for p in PARTS
            if p not in VARIANTS[variant][0]}


def candidate(variant: str) -> str:
    """The arm name of a variant fine-tuned to be chosen on validation."""
    return f"srdrl_best_{variant}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--scale", choices=list(SCALES), default="full")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--jobs", type=int, default=2, help="processes at a time")
    p.add_argument("--gpus", type=int, default=1, help="with cuda: jobs go round these GPUs")
    p.add_argument("--arms", nargs="+", default=None,
                   help="scales with arms fixed in advance (session, session_choice): run and "
                        "tabulate only these arms now")
    p.add_argument("--stage", choices=["base", "val", "all"], default="all",
                   help="'base': stop after the base policies; 'val': stop after the "
                        "validation choice (no test evaluation)")
    p.add_argument("--table_only", action="store_true",
                   help="scales with arms fixed in advance: run nothing, tabulate the arms "
                        "whose test reports are all there and list the others as not run")
    p.add_argument("--eval_seeds", type=int, nargs="+", default=None,
                   help="with --table_only: tabulate these evaluation seeds only (e.g. the "
                        "ones every arm got when a call ran out of time), written to "
                        "OUT/results_eval_seeds_<seeds>.json and table_eval_seeds_<seeds>.md")
    return p.parse_args(argv)


class Runner:
    """Runs module commands as subprocesses, ``jobs`` at a time, each with its log."""

    def __init__(self, args):
        self.args, self.count = args, 0

    def env(self, slot: int) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env["OMP_NUM_THREADS"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = (str(slot % self.args.gpus) if self.args.device == "cuda"
                                       else "")
        return env

    def one(self, slot: int, module: str, argv: list[str], done: Path, log: Path) -> None:
        if done.exists():
            return
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-m", module, *argv], stdout=f,
                                stderr=subprocess.STDOUT, env=self.env(slot)).returncode
        if rc != 0 or not done.exists():
            raise RuntimeError(f"{module} failed (exit {rc}); see {log}")
        print(f"  done {log.stem}", flush=True)

    def many(self, tasks: list[tuple]) -> None:
        self.chains([[t] for t in tasks])

    def chains(self, chains: list[list[tuple]]) -> None:
        """Each chain's tasks one after another; ``jobs`` chains at a time. A chain's first
        task makes what the others read (a fine-tuned policy): when it has to run again (a
        chain cut short, its weights not kept), the outputs the others left from the
        earlier run, finished or cut short, are removed first, so every file of a run's
        reports comes from one policy."""
        def run(slot, chain):
            if chain[-1][2].exists():  # finished earlier: its policy may not be here at all
                return
            if not chain[0][2].exists():
                for _module, _argv, done, _log in chain[1:]:
                    if done.parent.exists():
                        shutil.rmtree(done.parent)
                        print(f"  removed {done.parent} (from an earlier run of "
                              f"{chain[0][3].stem})", flush=True)
            for task in chain:
                self.one(slot, *task)
        with ThreadPoolExecutor(max(1, self.args.jobs)) as pool:
            list(pool.map(lambda it: run(*it), enumerate(chains)))


def make_data(runner: Runner, out: Path, s: dict) -> dict:
    """Every set through srdrl-make-data; returns the paths and the test set's counts."""
    sets = {"source": ("source", 0.0, s["source"], 1),
            "test": ("test", 0.0, s["test"] + 1, s["test"])}
    sets.update({f"target{n:g}": ("target", n, s["target"] + s["val"], s["val"])
                 for n in s["noise"]})
    tasks, seeds = [], {**DATA_SEEDS, **s.get("data_seeds", {})}
    for name, (seed_of, noise, total, val) in sets.items():
        argv = ["--output_dir", str(out / "data" / name), "--num_scenes", str(total),
                "--label_noise", str(noise), "--seed", str(seeds[seed_of]),
                "--width", str(s["width"]), "--height", str(s["height"]),
                "--val_fraction", repr(val / total)]
        tasks.append(("srdrl.data.synthetic", argv, out / "data" / name / "val.jsonl",
                      out / "logs" / f"data_{name}.log"))
    runner.many(tasks)
    return test_counts(out, s)


def test_counts(out: Path, s: dict) -> dict:
    """The test set's scenes and in-path scenes (at least ``min_test_in_path``). With the
    data gone (``--table_only`` where only the reports were kept), the counts recorded in
    OUT/results.json by the run that had it."""
    path = out / "data/test/val.jsonl"
    if not path.is_file():
        recorded = out / "results.json"
        if not recorded.is_file():
            raise SystemExit(f"{path}: no test set, and no {recorded} recording its counts")
        return json.loads(recorded.read_text())["data"]
    test = [json.loads(line) for line in path.read_text().splitlines()]
    in_path = sum(any(h["in_path"] for h in r["hazards"]) for r in test)
    if in_path < s["min_test_in_path"]:
        raise SystemExit(f"test set has {in_path} in-path scenes, fewer than "
                         f"{s['min_test_in_path']}: raise the test size")
    return {"test_scenes": len(test), "test_in_path_scenes": in_path}


def train_task(out: Path, name: str, data: Path, policy: str, steps: int, seed: int,
               flags: list[str], s: dict, batch: int | None = None) -> tuple:
    run = out / "runs" / name
    argv = ["--data_path", str(data), "--output_dir", str(run), "--policy", policy,
            "--max_steps", str(steps), "--seed", str(seed), "--per_device_train_batch_size",
            str(batch or s["batch"]), "--logging_steps", str(max(1, steps // 50)),
            "--eval_samples", "0",
            "--dataloader_workers", "1", "--save_total_limit", "1", "--overwrite_output_dir",
            *flags]
    return ("srdrl.train", argv, run / "policy" / "model.safetensors",
            out / "logs" / f"{name}.log")


def finetune_task(out: Path, s: dict, arm: str, noise: float, base_seed: int,
                  flags: list[str]) -> tuple:
    """Fine-tune base ``base_seed`` on the target set at ``noise`` with an arm's flags."""
    return train_task(out, run_name(arm, noise, base_seed),
                      out / "data" / f"target{noise:g}" / "train.jsonl",
                      str(out / "runs" / f"base_seed{base_seed}" / "policy"), s["steps"],
                      1000 + base_seed, ["--learning_rate", str(s["lr"]), *flags], s)


def eval_task(out: Path, name: str, split: Path, tag: str, seed: int, s: dict,
              pictures: int = 0, oracle: bool = True) -> tuple:
    dest = eval_dir(out, name, tag, seed)
    # the oracle-reasoning diagnostic on the first evaluation seed only
    first = oracle and seed == s["eval_seeds"][0]
    modes = ["generated", "oracle"] if first else ["generated"]
    argv = ["--policy", str(out / "runs" / name / "policy"), "--data_path", str(split),
            "--output_dir", str(dest), "--reasoning_modes", *modes, "--batch_size", "32",
            "--num_seeds", "1", "--seed", str(seed), "--num_samples", str(s["eval_samples"]),
            "--no_image_ablation", "--pictures", str(pictures), "--train_data_path", "none"]
    return ("srdrl.evaluate", argv, dest / "eval_report.json",
            out / "logs" / f"eval_{name}_{tag}_seed{seed}.log")


def finetune(runner: Runner, out: Path, s: dict, arms: dict[str, list[str]],
             levels: dict[str, list[float]]) -> None:
    """Fine-tune each arm on its noise levels from every base; evaluate on validation."""
    train, evals = [], []
    for arm, flags in arms.items():
        for noise in levels[arm]:
            target = out / "data" / f"target{noise:g}"
            for b in s["base_seeds"]:
                train.append(finetune_task(out, s, arm, noise, b, flags))
                evals.append(eval_task(out, run_name(arm, noise, b), target / "val.jsonl",
                                       "val", 0, s))
    runner.many(train)
    runner.many(evals)


def val_score(out: Path, arm: str, s: dict) -> dict:
    reports = [read_eval(out, run_name(arm, ABLATION_NOISE, b), "val", 0)[0]
               for b in s["base_seeds"]]
    return {k: mean_present([r.get(k) for r in reports]) for k in TABLE_METRICS}


def choose(out: Path, s: dict) -> tuple[str, dict]:
    """The variant with the lowest validation in-path crossing whose hazard-free ADE stays
    within 10% of supervised's (if none does, the lowest crossing, marked)."""
    scores = {v: val_score(out, candidate(v), s) for v in s["variants"]}
    ref = val_score(out, "supervised", s)["ade_hazard_free"]
    ok = [v for v in scores if ref is None or (scores[v]["ade_hazard_free"] or 0) <= 1.1 * ref]
    pick = min(ok or scores, key=lambda v: scores[v]["hazard_crossing_rate_in_path_scenes"]
               if scores[v]["hazard_crossing_rate_in_path_scenes"] is not None else 1.0)
    return pick, {"validation": scores, "supervised_ade_hazard_free": ref,
                  "within_ade_bound": bool(ok), "chosen": pick}


def fixed_arms(runner: Runner, out: Path, s: dict, args, data: dict) -> int:
    """A scale whose arms are fixed before any run (``arm_levels``). Each fine-tuning is
    chained with its evaluations, so a short run's core goes on to evaluate at once and no
    fine-tuned weights need to outlive the call. The first base's noisy fine-tunings are
    also evaluated on their own training scenes, with pictures (``TRAIN_PICTURES``): which
    wrong labels the policy left behind, and which not. That evaluation comes before the
    test ones, so a chain whose test evaluations are done (carried from an earlier call
    without weights) is skipped without it.

    With one variant, it is srdrl_best, and its one-part-removed ablations and
    ``ADDITIONS`` are arms. With several, each is a candidate arm at ``ABLATION_NOISE``,
    also evaluated on the validation split (as is ``supervised`` there, for the ADE bound),
    and :func:`choose` picks srdrl_best from the validation reports alone once every
    candidate's are in; every candidate is evaluated on test in its chain all the same
    (its weights are not kept), and the table marks which one was chosen. srdrl_best at
    ABLATION_NOISE is the chosen candidate's runs; at the scale's ``best_levels`` it is
    fine-tuned with the chosen flags, an arm that exists only once the choice is made.

    ``--table_only`` runs nothing and tabulates the arms whose test reports are all in."""
    variants = s["variants"]
    choosing = len(variants) > 1
    pick, choice = variants[0], {"chosen": variants[0]}
    if choosing:
        flags = {**FIXED_ARMS, **{candidate(v): best_flags(v) for v in variants}}
        levels = {**s["arm_levels"], **{candidate(v): [ABLATION_NOISE] for v in variants}}
        pick, choice = choose_when_ready(out, s)
        if pick is not None:  # at ABLATION_NOISE srdrl_best is a link to the candidate
            flags["srdrl_best"] = flags[candidate(pick)]
            levels["srdrl_best"] = [n for n in s.get("best_levels", []) if n != ABLATION_NOISE]
    else:
        flags = {**FIXED_ARMS, "srdrl_best": best_flags(pick),
                 **{a: best_flags(pick) + extra for a, extra in ADDITIONS.items()},
                 **ablations(pick)}
        levels = s["arm_levels"]
    test = out / "data/test/val.jsonl"
    if args.arms:  # a subset now (e.g. one device call's share); the rest on a later call
        unknown = sorted(set(args.arms) - set(levels))
        if unknown:
            pending = " (srdrl_best: the validation choice is pending)" if (
                choosing and pick is None and "srdrl_best" in unknown) else ""
            raise SystemExit(f"--arms {' '.join(unknown)}: not arms of the {args.scale} scale "
                             f"({', '.join(levels)}){pending}")
        run_levels = {a: n for a, n in levels.items() if a in args.arms}
    else:
        run_levels = levels
    chains = []
    for arm, noises in run_levels.items():
        for noise in noises:
            for b in s["base_seeds"]:
                name = run_name(arm, noise, b)
                target = out / "data" / f"target{noise:g}"
                on_val = ([eval_task(out, name, target / "val.jsonl", "val", 0, s)]
                          if choosing and noise == ABLATION_NOISE
                          and (arm in map(candidate, variants) or arm == "supervised")
                          else [])
                on_train = ([eval_task(out, name, target / "train.jsonl", "train", 0, s,
                                       TRAIN_PICTURES, oracle=False)]
                            if noise > 0 and b == s["base_seeds"][0] else [])
                chains.append([finetune_task(out, s, arm, noise, b, flags[arm]), *on_val,
                               *on_train, *[eval_task(out, name, test, "test", e, s)
                                            for e in s["eval_seeds"]]])
    chains.sort(key=lambda c: "--rollout_reasoning" not in c[0][1])  # the slowest first
    if not args.table_only:
        runner.chains(chains)
    if choosing and pick is None:  # the candidates' validation may have come in just now
        pick, choice = choose_when_ready(out, s)
    if choosing and pick is not None:
        flags["srdrl_best"] = flags[candidate(pick)]
        link_chosen(out, s, pick)
        run_levels = {**run_levels, "srdrl_best": sorted(
            {*run_levels.get("srdrl_best", []), ABLATION_NOISE})}
    meta = {"scale": args.scale, "settings": s, "data": data, "choice": choice}
    if args.table_only:
        done = {a: [n for n in ns if all(
            (eval_dir(out, run_name(a, n, b), "test", e) / "eval_report.json").is_file()
            for b in s["base_seeds"] for e in s["eval_seeds"])] for a, ns in run_levels.items()}
        meta["not_run"] = [f"{a} at noise {n:g}" for a, ns in run_levels.items() for n in ns
                           if n not in done[a]]
        run_levels = {a: ns for a, ns in done.items() if ns}
    meta["arms"] = {a: flags.get(a) for a in run_levels}
    suffix = ("_eval_seeds_" + "_".join(map(str, s["eval_seeds"]))
              if args.eval_seeds is not None else "")
    return report(out, s, run_levels, meta, suffix)


def choose_when_ready(out: Path, s: dict) -> tuple[str | None, dict]:
    """:func:`choose` once the validation reports of every candidate and of supervised are
    all in; (None, a pending note) before."""
    ready = [candidate(v) for v in s["variants"]] + ["supervised"]
    if not all((eval_dir(out, run_name(a, ABLATION_NOISE, b), "val", 0) / "eval_report.json")
               .is_file() for a in ready for b in s["base_seeds"]):
        return None, {"chosen": None, "pending": "validation reports of every candidate and "
                                                 "of supervised are not all in yet"}
    return choose(out, s)


def link_chosen(out: Path, s: dict, pick: str) -> None:
    """srdrl_best's runs at ABLATION_NOISE are the chosen variant's (symbolic links; a link
    to another run is replaced, a real directory there is an error)."""
    for b in s["base_seeds"]:
        alias = out / "runs" / run_name("srdrl_best", ABLATION_NOISE, b)
        target = run_name(candidate(pick), ABLATION_NOISE, b)
        if alias.is_symlink():
            if os.readlink(alias) == target:
                continue
            alias.unlink()
        elif alias.exists():
            raise SystemExit(f"{alias} is a directory, not a link to the chosen variant's "
                             f"run {target}: move it away")
        alias.symlink_to(target)


def main(argv=None) -> int:
    args = parse_args(argv)
    s, out = SCALES[args.scale], Path(args.out)
    runner = Runner(args)
    if args.eval_seeds is not None:
        if not args.table_only:
            raise SystemExit("--eval_seeds: only with --table_only (runs are evaluated on "
                             "the scale's own seeds)")
        unknown = sorted(set(args.eval_seeds) - set(s["eval_seeds"]))
        if unknown:
            raise SystemExit(f"--eval_seeds {' '.join(map(str, unknown))}: not evaluation "
                             f"seeds of the {args.scale} scale ({s['eval_seeds']})")
        s = dict(s, eval_seeds=sorted(set(args.eval_seeds)))
    if args.table_only:
        if "arm_levels" not in s:
            raise SystemExit(f"--table_only: the {args.scale} scale has no arms fixed in "
                             "advance")
        return fixed_arms(runner, out, s, args, test_counts(out, s))
    data = make_data(runner, out, s)
    runner.many([train_task(out, f"base_seed{b}", out / "data/source/train.jsonl", "tiny",
                            s["base_steps"], b, ["--rl_loss_weight", "0", "--learning_rate",
                                                 str(s["base_lr"])], s, batch=s["base_batch"])
                 for b in s["base_seeds"]])
    if args.stage == "base":
        return 0
    if "arm_levels" in s:
        if args.stage == "val":
            raise SystemExit(f"--stage val: the {args.scale} scale has no separate validation "
                             "stage (each fine-tuning is chained with its evaluations)")
        return fixed_arms(runner, out, s, args, data)
    every, worst = s["noise"], [ABLATION_NOISE]
    finetune(runner, out, s, {**FIXED_ARMS, **{candidate(v): best_flags(v)
                                               for v in s["variants"]}},
             {**{a: every for a in FIXED_ARMS}, **{candidate(v): worst
                                                    for v in s["variants"]}})
    pick, choice = choose(out, s)
    link_chosen(out, s, pick)
    final = {"srdrl_best": best_flags(pick), **ablations(pick)}
    finetune(runner, out, s, final, {a: every if a == "srdrl_best" else worst for a in final})
    meta = {"scale": args.scale, "settings": s, "data": data, "choice": choice,
            "arms": {**FIXED_ARMS, **final}}
    if args.stage == "val":
        (out / "results.json").write_text(json.dumps(meta, indent=2))
        return 0
    levels = {a: every for a in (*FIXED_ARMS, "srdrl_best")}
    levels.update({a: worst for a in final if a != "srdrl_best"})
    test = out / "data/test/val.jsonl"
    runner.many([eval_task(out, run_name(a, n, b), test, "test", e, s) for a, ns in
                 levels.items() for n in ns for b in s["base_seeds"] for e in s["eval_seeds"]])
    return report(out, s, levels, meta)


if __name__ == "__main__":
    raise SystemExit(main())
