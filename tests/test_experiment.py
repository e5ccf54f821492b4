"""The noisy-label experiment's statistics (known answers) and its smoke scale end to end."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from experiment_stats import paired_bootstrap_ratio, training_summary  # noqa: E402


def test_bootstrap_of_two_scenes_has_the_enumerated_distribution():
    # scenes: the reference crosses in both, the arm in the first only. Drawing two scenes
    # with replacement gives the ratio 1 (1/4), 1/2 (1/2) or 0 (1/4): the 95% interval is
    # [0, 1] and the point estimate 1/2.
    r = paired_bootstrap_ratio(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]),
                               resamples=4000, seed=1)
    assert r["ratio"] == 0.5 and r["ci_low"] == 0.0 and r["ci_high"] == 1.0
    narrow = paired_bootstrap_ratio(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]),
                                    resamples=4000, level=0.4, seed=1)
    assert narrow["ci_low"] == narrow["ci_high"] == 0.5  # the middle 40% is all 1/2


def test_bootstrap_resamples_runs_too_and_keeps_pairs():
    # two runs of one scene: the arm crosses in run 0 only -> the same three-point law
    r = paired_bootstrap_ratio(np.array([[1.0], [0.0]]), np.array([[1.0], [1.0]]),
                               resamples=4000, seed=2)
    assert (r["ratio"], r["ci_low"], r["ci_high"]) == (0.5, 0.0, 1.0)
    same = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    r = paired_bootstrap_ratio(same, same, resamples=500)
    assert r["ci_low"] == r["ci_high"] == 1.0  # paired draws: an arm equal to the reference
    half = paired_bootstrap_ratio(0.5 * same, same, resamples=500)
    assert half["ci_low"] == half["ci_high"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        paired_bootstrap_ratio(np.ones((2, 3)), np.ones((3, 2)))


def test_training_summary_reads_gate_precision_and_recall(tmp_path):
    rows = [{"step": 1, "loss": 1.0},  # a supervised row: no RL metrics
            {"gt_is_best": 1.0, "label_beaten": 0.0, "gate_fired": 0.5,
             "gate_fired_noisy": 0.25, "label_noisy": 0.5},
            {"gt_is_best": 0.5, "label_beaten": 0.5, "gate_fired": 0.0,
             "gate_fired_noisy": 0.0, "label_noisy": 0.25}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = training_summary(path)
    assert s["gt_is_best"] == 0.75 and s["gt_is_best_last_fifth"] == 0.5
    assert s["gate_precision"] == pytest.approx(0.125 / 0.25)  # fired 0.25, hit 0.125
    assert s["gate_recall"] == pytest.approx(0.125 / 0.375)


def write_eval(out: Path, name: str, tag: str, seed: int, crosses: int, ade: float = 0.2):
    """An evaluation's files as srdrl-eval writes them: 10 in-path scenes of which the first
    ``crosses`` cross, and 2 scenes out of the way (crossing, not counted)."""
    dest = out / "runs" / name / f"eval_{tag}_seed{seed}"
    dest.mkdir(parents=True)
    report = {"evaluation": {"modes": {"generated": {
        "hazard_crossing_rate_in_path_scenes": crosses / 10, "ade_hazard_free": ade}}}}
    (dest / "eval_report.json").write_text(json.dumps(report))
    rows = [{"index": i, "in_path": i < 10, "crosses": i < crosses or i >= 10}
            for i in range(12)]
    (dest / "eval_scenes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (dest.parent / "metrics.jsonl").write_text("")


def test_table_gives_ablations_their_ratio_to_the_full_configuration(tmp_path):
    """Known answer from written evaluation files: over 10 in-path scenes supervised
    crosses in 8, srdrl_best in 2 and its ablation in 4 (and 2 scenes out of the way)."""
    import experiment_table as exp

    crossing = {"supervised": 8, "srdrl_best": 2, "without_relative_gate": 4}
    for arm, n in crossing.items():
        write_eval(tmp_path, exp.run_name(arm, 0.3, 0), "test", 0, n)
    own = tmp_path / "runs" / exp.run_name("srdrl_best", 0.3, 0) / "eval_train_seed0"
    own.mkdir()
    (own / "eval_report.json").write_text(json.dumps(
        {"evaluation": {"modes": {"generated": {"noisy_label_left_behind_rate": 0.75}}},
         "pictures": ["pictures/bev_00_train_000003.png"]}))
    s = {"base_seeds": [0], "eval_seeds": [0], "resamples": 200}
    rows = exp.test_table(tmp_path, s, {arm: [0.3] for arm in crossing})
    best = rows[("srdrl_best", 0.3)]
    assert best["train_noisy_left_behind (base 0)"] == 0.75
    assert best["train_pictures"] == [str(own / "pictures/bev_00_train_000003.png")]
    assert rows[("supervised", 0.3)]["train_noisy_left_behind (base 0)"] is None
    ablation = rows[("without_relative_gate", 0.3)]
    assert ablation["ratio_vs_srdrl_best"]["ratio"] == pytest.approx(2.0)
    assert ablation["ratio_vs_supervised"]["ratio"] == pytest.approx(0.5)
    assert rows[("srdrl_best", 0.3)]["ratio_vs_supervised"]["ratio"] == pytest.approx(0.25)
    assert "ratio_vs_srdrl_best" not in rows[("srdrl_best", 0.3)]
    meta = {"scale": "t", "data": {"test_in_path_scenes": 10, "test_scenes": 12},
            "choice": {"chosen": "v1"}}
    line = next(x for x in exp.markdown(rows, meta).splitlines() if "without_relative" in x)
    assert line.split("|")[-2].strip().startswith("2.000 [")  # the last column


def test_table_only_tabulates_what_is_in_and_names_the_rest(tmp_path, monkeypatch):
    """--table_only from reports alone (no data, no weights, as carried back from a device):
    the choice from the validation reports, srdrl_best at noise 0.3 linked to it, arms
    missing an evaluation listed as not run, and --eval_seeds tabulating the seeds every
    arm got. Known answers: supervised crosses 8 of 10 in-path scenes at noise 0.3, the
    chosen candidate 4 (so 0.5x), 6 at noise 0.1 (srdrl_best 3 there, seed 0 only)."""
    import noisy_label_experiment as exp

    small = dict(exp.SCALES["session_choice"], base_seeds=[0], eval_seeds=[0, 1],
                 resamples=100)
    monkeypatch.setitem(exp.SCALES, "session_choice", small)
    val = {"v1": (5, 0.2), "anchors": (3, 0.5), "anchors_without_label_baseline": (4, 0.21)}
    for v, (crosses, ade) in val.items():  # anchors crosses least but is out of the ADE bound
        write_eval(tmp_path, f"srdrl_best_{v}_noise0.3_seed0", "val", 0, crosses, ade)
        for e in (0, 1):
            write_eval(tmp_path, f"srdrl_best_{v}_noise0.3_seed0", "test", e, 4)
    write_eval(tmp_path, "supervised_noise0.3_seed0", "val", 0, 8, 0.2)
    for arm, noise, crosses, seeds in [("supervised", 0.0, 5, (0, 1)),
                                       ("supervised", 0.1, 6, (0, 1)),
                                       ("supervised", 0.3, 8, (0, 1)),
                                       ("srdrl_seed", 0.3, 7, (0, 1)),
                                       ("srdrl_seed", 0.1, 5, (1,)),
                                       ("srdrl_best", 0.1, 3, (0,))]:
        for e in seeds:
            write_eval(tmp_path, exp.run_name(arm, noise, 0), "test", e, crosses)
    argv = ["--out", str(tmp_path), "--scale", "session_choice", "--device", "cpu",
            "--table_only"]
    with pytest.raises(SystemExit, match="no test set, and no"):
        exp.main(argv)
    (tmp_path / "results.json").write_text(json.dumps(
        {"data": {"test_scenes": 12, "test_in_path_scenes": 10}}))
    assert exp.main(argv) == 0
    assert not (tmp_path / "logs").exists()  # nothing ran
    meta = json.loads((tmp_path / "results.json").read_text())
    assert meta["choice"]["chosen"] == "anchors_without_label_baseline"
    assert (tmp_path / "runs/srdrl_best_noise0.3_seed0").resolve() == (
        tmp_path / "runs/srdrl_best_anchors_without_label_baseline_noise0.3_seed0")
    assert sorted(meta["not_run"]) == ["srdrl_best at noise 0", "srdrl_best at noise 0.1",
                                       "srdrl_seed at noise 0", "srdrl_seed at noise 0.1"]
    rows = {(r["arm"], r["noise"]): r for r in meta["test"]}
    assert rows[("srdrl_best", 0.3)]["ratio_vs_supervised"]["ratio"] == pytest.approx(0.5)
    assert ("srdrl_best", 0.1) not in rows
    assert "not run: " in (tmp_path / "table.md").read_text()

    assert exp.main([*argv, "--eval_seeds", "0"]) == 0
    meta = json.loads((tmp_path / "results_eval_seeds_0.json").read_text())
    rows = {(r["arm"], r["noise"]): r for r in meta["test"]}
    assert rows[("srdrl_best", 0.1)]["ratio_vs_supervised"]["ratio"] == pytest.approx(0.5)
    assert ("srdrl_seed", 0.1) not in rows  # evaluated on seed 1 only
    assert "evaluation seeds 0;" in (tmp_path / "table_eval_seeds_0.md").read_text()
    assert (tmp_path / "table.md").is_file()  # the full table is left as it was
    with pytest.raises(SystemExit, match="not evaluation seeds"):
        exp.main([*argv, "--eval_seeds", "7"])
    with pytest.raises(SystemExit, match="only with --table_only"):
        exp.main([*argv[:-1], "--eval_seeds", "0"])


def test_a_chain_that_fine_tunes_again_drops_the_reports_of_the_earlier_policy(tmp_path):
    """A chain cut short (its policy not kept, one evaluation done, one cut short): the
    fine-tuning runs again, so what the evaluations left from the earlier policy is removed
    and they are redone; with the policy there, finished evaluations are kept."""
    import noisy_label_experiment as exp

    ran = []

    class Recording(exp.Runner):
        def one(self, slot, module, argv, done, log):
            if done.exists():
                return
            ran.append(done.parent.name)
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text("new")

    def task(name):
        return ("module", [], tmp_path / name / "report.json", tmp_path / f"{name}.log")

    chain = [task("policy"), task("eval_seed0"), task("eval_seed1")]
    earlier = tmp_path / "eval_seed0"
    earlier.mkdir()
    (earlier / "report.json").write_text("old")
    (earlier / "picture.png").write_text("")
    cut = tmp_path / "eval_seed1"  # cut short: no report, a file of the earlier policy
    cut.mkdir()
    (cut / "scenes.jsonl").write_text("old")
    runner = Recording(exp.parse_args(["--out", str(tmp_path), "--jobs", "1"]))
    runner.chains([chain])
    assert ran == ["policy", "eval_seed0", "eval_seed1"]
    assert (earlier / "report.json").read_text() == "new"
    assert not (earlier / "picture.png").exists()
    assert not (cut / "scenes.jsonl").exists()
    ran.clear()
    (tmp_path / "eval_seed1" / "report.json").unlink()
    runner.chains([chain])
    assert ran == ["eval_seed1"]


@pytest.mark.heavy
def test_smoke_scale_runs_end_to_end(tmp_path):
    import noisy_label_experiment as exp

    assert exp.main(["--out", str(tmp_path), "--scale", "smoke", "--device", "cpu",
                     "--jobs", "2"]) == 0
    meta = json.loads((tmp_path / "results.json").read_text())
    arms = {row["arm"] for row in meta["test"]}
    assert {"supervised", "srdrl_seed", "srdrl_best"} <= arms
    assert {f"without_{p}" for p in exp.PARTS} <= arms
    best = next(r for r in meta["test"] if r["arm"] == "srdrl_best")
    assert best["ratio_vs_supervised"]["scenes"] == meta["data"]["test_in_path_scenes"]
    assert "in-path crossing / supervised" in (tmp_path / "table.md").read_text()


@pytest.mark.heavy
def test_fixed_arms_scale_chains_training_and_test(tmp_path, monkeypatch):
    """The session scale's path: arms fixed in advance, no validation stage, each
    fine-tuning chained with its test evaluations, ratios against supervised at the same
    noise and at noise 0."""
    import noisy_label_experiment as exp

    small = dict(exp.SCALES["session"], source=16, target=16, val=6, test=10, width=128,
                 height=96, base_steps=2, base_batch=2, steps=2, batch=2, eval_samples=2,
                 resamples=100, min_test_in_path=0, base_seeds=[0])
    monkeypatch.setitem(exp.SCALES, "session", small)
    argv = ["--out", str(tmp_path), "--scale", "session", "--device", "cpu", "--jobs", "2"]
    with pytest.raises(SystemExit, match="srdrl_worst"):
        exp.main([*argv, "--arms", "supervised", "srdrl_worst"])
    assert exp.main([*argv, "--arms", "supervised"]) == 0  # one call's share
    meta = json.loads((tmp_path / "results.json").read_text())
    assert {r["arm"] for r in meta["test"]} == {"supervised"}
    assert not (tmp_path / "runs" / "srdrl_best_noise0.3_seed0").exists()
    assert exp.main(argv) == 0  # the rest
    meta = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["arm"], r["noise"]): r for r in meta["test"]}
    assert set(rows) == {(a, n) for a, ns in small["arm_levels"].items() for n in ns}
    assert not list(tmp_path.glob("runs/*/eval_val_*"))  # nothing evaluated on validation
    assert "ratio_vs_clean_supervised" in rows[("srdrl_best", 0.3)]
    assert "ratio_vs_srdrl_best" in rows[("without_relative_gate", 0.3)]
    # the first base's noisy fine-tunings are also evaluated on their own training scenes
    assert (tmp_path / "runs/srdrl_best_noise0.3_seed0/eval_train_seed0/eval_report.json"
            ).is_file()
    assert not (tmp_path / "runs/supervised_noise0_seed0/eval_train_seed0").exists()
    assert "ratio_vs_supervised" not in rows[("supervised", 0.3)]
    # the oracle diagnostic on the first evaluation seed only
    second = tmp_path / "runs" / "supervised_noise0_seed0" / "eval_test_seed1"
    modes = json.loads((second / "eval_report.json").read_text())["evaluation"]["modes"]
    assert set(modes) == {"generated"}
    # a rerun, as in a second device call that carried reports but no fine-tuned weights,
    # skips every finished chain instead of training or evaluating again
    for weights in tmp_path.glob("runs/*_noise*/policy/model.safetensors"):
        weights.unlink()
    logs = {f: f.stat().st_mtime_ns for f in (tmp_path / "logs").iterdir()}
    assert exp.main(argv) == 0
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "logs").iterdir()} == logs


def test_variants_leave_parts_out_and_data_seeds_follow_the_scale(tmp_path):
    import noisy_label_experiment as exp

    flags = exp.best_flags("anchors_without_label_baseline")
    assert flags[flags.index("--num_anchors") + 1] == "16"
    assert "--awr_baseline" not in flags and "--lower_traj_weight_when_beaten" in flags
    assert "without_label_baseline" not in exp.ablations("anchors_without_label_baseline")
    assert set(exp.ablations("v1")) == {f"without_{p}" for p in exp.PARTS}

    seeds = {}

    class Recorder:
        def many(self, tasks):
            for _module, argv, done, _log in tasks:
                seeds[Path(argv[argv.index("--output_dir") + 1]).name] = int(
                    argv[argv.index("--seed") + 1])
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text("")

    s = dict(exp.SCALES["session_choice"], min_test_in_path=0)
    exp.make_data(Recorder(), tmp_path, s)
    assert seeds == {"source": 101, "test": 404, "target0": 202, "target0.1": 202,
                     "target0.3": 202}


@pytest.mark.heavy
def test_choice_scale_picks_on_validation_only(tmp_path, monkeypatch):
    """session_choice: candidates and supervised at noise 0.3 are also evaluated on the
    validation split; srdrl_best is chosen from those reports once all are in (a partial
    call leaves the choice pending) and links to the chosen candidate's runs."""
    import noisy_label_experiment as exp

    small = dict(exp.SCALES["session_choice"], source=16, target=16, val=6, test=10,
                 width=128, height=96, base_steps=2, base_batch=2, steps=2, batch=2,
                 eval_samples=2, resamples=100, min_test_in_path=0, base_seeds=[0],
                 eval_seeds=[0])
    monkeypatch.setitem(exp.SCALES, "session_choice", small)
    argv = ["--out", str(tmp_path), "--scale", "session_choice", "--device", "cpu",
            "--jobs", "2"]
    assert exp.main([*argv, "--arms", "supervised", "srdrl_best_v1"]) == 0
    meta = json.loads((tmp_path / "results.json").read_text())
    assert meta["choice"]["chosen"] is None and "pending" in meta["choice"]
    assert exp.main(argv) == 0
    meta = json.loads((tmp_path / "results.json").read_text())
    pick = meta["choice"]["chosen"]
    assert pick in small["variants"] and set(meta["choice"]["validation"]) == set(
        small["variants"])
    runs = tmp_path / "runs"
    assert (runs / "srdrl_best_noise0.3_seed0").resolve() == (
        runs / f"srdrl_best_{pick}_noise0.3_seed0").resolve()
    for arm in [*(f"srdrl_best_{v}" for v in small["variants"]), "supervised"]:
        assert (runs / f"{arm}_noise0.3_seed0/eval_val_seed0/eval_report.json").is_file()
    assert not (runs / "srdrl_seed_noise0.3_seed0/eval_val_seed0").exists()
    assert not (runs / "supervised_noise0_seed0/eval_val_seed0").exists()
    # the rule, recomputed from the validation reports on disk: the lowest in-path
    # crossing among candidates within 10% of supervised's hazard-free ADE
    def on_val(arm):
        report = json.loads((runs / f"{arm}_noise0.3_seed0/eval_val_seed0/eval_report.json")
                            .read_text())["evaluation"]["modes"]["generated"]
        return report["hazard_crossing_rate_in_path_scenes"], report["ade_hazard_free"]

    scores = {v: on_val(f"srdrl_best_{v}") for v in small["variants"]}
    bound = 1.1 * on_val("supervised")[1]
    within = [v for v in scores if scores[v][1] <= bound]
    assert meta["choice"]["within_ade_bound"] == bool(within)
    assert scores[pick][0] == min(scores[v][0] for v in within or scores)
    assert meta["arms"]["srdrl_best"] == exp.best_flags(pick)
    rows = {(r["arm"], r["noise"]): r for r in meta["test"]}
    assert "ratio_vs_srdrl_best" not in rows[(f"srdrl_best_{pick}", 0.3)]  # itself
    others = [v for v in small["variants"] if v != pick]
    assert all("ratio_vs_srdrl_best" in rows[(f"srdrl_best_{v}", 0.3)] for v in others)
    assert "chosen on validation" in (tmp_path / "table.md").read_text()
    # srdrl_best at the other noise levels exists once the choice is made: the next call
    # fine-tunes it there with the chosen flags
    assert not (runs / "srdrl_best_noise0.1_seed0").exists()
    assert exp.main(argv) == 0
    meta = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["arm"], r["noise"]) for r in meta["test"]}
    for noise in small["best_levels"]:
        run = runs / f"srdrl_best_noise{noise:g}_seed0"
        assert not run.is_symlink() and ("srdrl_best", noise) in rows
        objective = json.loads((run / "train_config.json").read_text())["objective"]
        chosen = exp.best_flags(pick)
        assert objective["num_anchors"] == (16 if "--num_anchors" in chosen else 0)
        assert (objective["awr_baseline"] == "label") == ("--awr_baseline" in chosen)
    with pytest.raises(SystemExit, match="no separate validation stage"):
        exp.main([*argv, "--stage", "val"])
