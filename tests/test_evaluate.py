"""srdrl-eval: the command end to end, the gate diagnostics on known answers, bad inputs."""

import json
import sys

import numpy as np
import pytest
import torch

from srdrl import evaluate, visualize
from srdrl.config import RewardConfig
from srdrl.data.dataset import JsonlDataset
from srdrl.data.synthetic import SyntheticDataConfig, make_dataset
from srdrl.evaluate import (
    LabelScores,
    auroc,
    choose_scenes,
    evaluate_policy,
    gate_diagnostics,
    gate_statistics,
    main,
)
from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer
from srdrl.rewards import RewardTerms, danger_confidence, trust_gate

OLD_REPORT_KEYS = {
    "scenes", "num_samples", "hazard_crossing_rate", "hazard_crossing_rate_in_path_scenes",
    "label_hazard_crossing_rate", "ade", "fde", "ade_hazard_free", "fde_hazard_free",
    "min_ade", "reasoning_alignment_rate", "peak_accel_mean", "peak_jerk_mean",
    "actions_in_bounds",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's layout: RUN/data/{train,val}.jsonl, RUN/policy, RUN/metrics.jsonl.
    Seed 0 gives noisy and clean labels in both splits."""
    run = tmp_path_factory.mktemp("run")
    make_dataset(SyntheticDataConfig(output_dir=str(run / "data"), num_scenes=10, width=128,
                                     height=96, label_noise=0.5, seed=0, val_fraction=0.3),
                 progress=False)
    texts = [r["reasoning"] for r in JsonlDataset(run / "data" / "train.jsonl").records]
    torch.manual_seed(0)
    config = PolicyConfig.tiny()
    VLAPolicy(config, build_tokenizer(config, texts)).save_pretrained(run / "policy")
    with open(run / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3, 2, 3, 4):  # a resumed run repeats steps 2 and 3
            f.write(json.dumps({"step": step, "loss": 3.0 / step, "traj_loss": 1.0 / step,
                                "reward_mean": 1.0 + 0.1 * step, "gt_is_best": 0.5}) + "\n")
    return run


def _args(run, *extra):
    return ["--policy", str(run / "policy"), "--data_path", str(run / "data" / "val.jsonl"),
            "--num_samples", "2", "--batch_size", "4", "--scoring_backend", "kornia", *extra]


def _in_unit(x):
    return x is None or 0.0 <= x <= 1.0


def test_cli_end_to_end(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    main(_args(run_dir, "--output_dir", str(out), "--pictures", "2"))
    printed = capsys.readouterr().out
    assert "hazard crossing rate" in printed and "trust gate on 7 training labels" in printed

    report = json.loads((out / "eval_report.json").read_text())
    assert report["train_data_path"].endswith("train.jsonl")  # found beside --data_path
    assert report["metrics_path"].endswith("metrics.jsonl")  # found beside --policy
    ev = report["evaluation"]
    assert OLD_REPORT_KEYS <= ev.keys()
    assert ev["scenes"] == 3 and ev["num_samples"] == 2 and ev["vehicle_half_width_m"] == 0.9
    for key in ("hazard_crossing_rate", "label_hazard_crossing_rate", "actions_in_bounds",
                "reasoning_alignment_rate", "noisy_label_left_behind_rate",
                "hazard_crossing_rate_in_path_scenes"):
        assert _in_unit(ev[key]), key
    assert 0 <= ev["min_ade"] <= ev["ade"] + 1e-9 and ev["fde"] >= 0
    assert ev["noisy_label_scenes"] == 1

    gate = report["gate_diagnostics"]
    assert gate["scenes"] == 7 and gate["noisy_labels"] == 3 and gate["clean_labels"] == 4
    for key in ("fire_rate_noisy", "fire_rate_clean", "precision", "recall", "f1",
                "auroc_one_minus_safety"):
        assert _in_unit(gate[key]), key
    for kind in ("noisy", "clean"):
        d = gate[f"label_safety_{kind}"]
        assert 0 <= d["min"] <= d["q25"] <= d["median"] <= d["q75"] <= d["max"] <= 1
    assert "in-sample" in gate["diagnostic_best_f1_unsafe_threshold"]["note"]

    rows = [json.loads(x) for x in (out / "eval_scenes.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in rows] == ["val_000007", "val_000008", "val_000009"]

    pictures = sorted(report["pictures"])
    assert pictures == sorted(["pictures/camera_frames.png", "pictures/gate_label_safety.png",
                               "pictures/training_curves.png",
                               *[p for p in pictures if p.startswith("pictures/bev_")]])
    assert len([p for p in pictures if p.startswith("pictures/bev_")]) == 2
    for p in pictures:
        size = (out / p).stat().st_size
        assert 1000 < size < 400_000, (p, size)
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_defaults_and_no_pictures(run_dir):
    """Default OUTPUT_DIR is POLICY/eval; 'none' skips the gate; --pictures 0 draws
    nothing."""
    main(_args(run_dir, "--pictures", "0", "--train_data_path", "none"))
    report = json.loads((run_dir / "policy" / "eval" / "eval_report.json").read_text())
    assert report["gate_diagnostics"] is None and report["pictures"] == []


def test_evaluate_policy_as_train_calls_it(run_dir):
    policy = VLAPolicy.from_pretrained(run_dir / "policy")
    report = evaluate_policy(policy, JsonlDataset(run_dir / "data" / "val.jsonl"),
                             num_samples=2, rewards=RewardConfig())
    assert OLD_REPORT_KEYS <= report.keys()
    evaluate.print_summary(report)


def test_non_finite_predictions_count_as_crossing(run_dir, capsys):
    """A policy whose paths are NaN fails every scene (it used to score crossing 0.000)."""
    policy = VLAPolicy.from_pretrained(run_dir / "policy")
    with torch.no_grad():
        policy.action_out_proj.bias.fill_(float("nan"))
    report = evaluate_policy(policy, JsonlDataset(run_dir / "data" / "val.jsonl"),
                             num_samples=2, rewards=RewardConfig(), progress=False)
    assert report["non_finite_predictions"] == report["scenes"] == 3
    assert report["hazard_crossing_rate"] == 1.0
    evaluate.print_summary(report)
    assert "NON-FINITE predictions 3 (counted as crossing)" in capsys.readouterr().out
    path = np.zeros((64, 3))
    assert not evaluate.crosses_any_hazard(path, [])
    path[5, 1] = np.inf
    assert evaluate.crosses_any_hazard(path, [])


# --------------------------------------------------------------------------- gate


# label safety, danger confidence of the reasoning, label_noisy; the gate (danger >= 0.3,
# safety < 0.3) fires on scenes 0, 1 (noisy) and 3 (clean): TP 2, FP 1, FN 1 (scene 2).
SAFETY = [0.1, 0.2, 0.5, 0.25, 0.9, 0.8, 0.05]
REASONING = ["mud", "rocks ahead", "water", "mud and water", "mud", "bump", "clear track"]
NOISY = [True, True, True, False, False, False, False]


def _check_known_gate(gate):
    assert gate["scenes"] == 7 and gate["noisy_labels"] == 3
    assert gate["precision"] == pytest.approx(2 / 3) and gate["recall"] == pytest.approx(2 / 3)
    assert gate["f1"] == pytest.approx(2 / 3)
    assert gate["fire_rate_noisy"] == pytest.approx(2 / 3)
    assert gate["fire_rate_clean"] == pytest.approx(1 / 4)
    assert gate["danger_named_rate_clean"] == pytest.approx(3 / 4)  # "clear track" names none
    noisy = gate["label_safety_noisy"]
    assert noisy["mean"] == pytest.approx(0.8 / 3) and noisy["median"] == pytest.approx(0.2)
    assert gate["label_safety_clean"]["median"] == pytest.approx(0.525)
    # pairs (noisy, clean) where the noisy label looks less safe: 3 + 3 + 2 of 12
    assert gate["auroc_one_minus_safety"] == pytest.approx(8 / 12)
    assert gate["auroc_one_minus_safety_danger_named"] == pytest.approx(8 / 9)
    # among danger-named scenes, flagging safety < 0.65 catches all 3 noisy labels and
    # one clean: F1 = 6/7, better than any other cut
    best = gate["diagnostic_best_f1_unsafe_threshold"]
    assert best["unsafe_threshold"] == pytest.approx(0.65)
    assert best["f1"] == pytest.approx(6 / 7) and best["precision"] == pytest.approx(0.75)
    assert best["recall"] == pytest.approx(1.0)


def test_gate_statistics_known_answer():
    cfg = RewardConfig()
    danger = torch.tensor([danger_confidence(t) for t in REASONING], dtype=torch.float64)
    fired = trust_gate(danger, torch.tensor(SAFETY, dtype=torch.float64), cfg)[1]
    scores = LabelScores(np.array(SAFETY), danger.numpy(), fired.numpy(), np.array(NOISY))
    _check_known_gate(gate_statistics(scores, cfg))


def test_gate_diagnostics_on_hand_made_data(run_dir, tmp_path):
    """Real data plumbing (batches, label_noisy, gate rule) with the path safety replaced
    by known values keyed by the reasoning text."""
    base = json.loads((run_dir / "data" / "train.jsonl").read_text().splitlines()[0])
    frame = str(run_dir / "data" / base["frame_paths"][0])
    lines = [json.dumps({**base, "frame_paths": [frame], "reasoning": f"{text} #{i}",
                         "label_noisy": noisy, "sample_id": f"hand_{i}"})
             for i, (text, noisy) in enumerate(zip(REASONING, NOISY, strict=True))]
    path = tmp_path / "hand.jsonl"
    path.write_text("\n".join(lines) + "\n")

    def fake_scores(images, candidates, label, history, K, T, reasoning, cfg):
        assert candidates.shape[1] == 1 and torch.equal(candidates[:, 0], label)
        index = [int(t.rsplit("#", 1)[1]) for t in reasoning]
        safety = torch.tensor([[SAFETY[i]] for i in index], dtype=torch.float64)
        danger = torch.tensor([danger_confidence(t) for t in reasoning], dtype=torch.float64)
        weight, fired = trust_gate(danger, safety[:, 0], cfg)
        ones = torch.ones_like(safety)
        return RewardTerms(ones, safety, ones, ones, weight, danger, fired,
                           torch.ones(*safety.shape, 64, dtype=torch.bool))

    _check_known_gate(gate_diagnostics(JsonlDataset(path), RewardConfig(), batch_size=3,
                                       scorer=fake_scores))


def test_auroc_matches_pair_count():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=41).astype(float)  # many ties
    positive = rng.random(41) < 0.4
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    pairs = ((pos > neg) + 0.5 * (pos == neg)).mean()
    assert auroc(scores, positive) == pytest.approx(pairs)
    assert auroc(scores, np.zeros(41, bool)) is None


def test_gate_needs_label_noisy(tmp_path, run_dir):
    record = json.loads((run_dir / "data" / "train.jsonl").read_text().splitlines()[0])
    record.pop("label_noisy")
    record["frame_paths"] = [str(run_dir / "data" / p) for p in record["frame_paths"]]
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="label_noisy"):
        gate_diagnostics(JsonlDataset(path))


# --------------------------------------------------------------------------- pictures


def test_choose_scenes_puts_abandoned_noisy_labels_first():
    scenes = [
        {"sample_id": "clean_far", "label_noisy": False, "ade": 5.0, "ade_to_label": 5.0,
         "crosses": False},
        {"sample_id": "clean_crossing", "label_noisy": False, "ade": 1.0, "ade_to_label": 1.0,
         "crosses": True},
        {"sample_id": "noisy_followed", "label_noisy": True, "ade": 2.0, "ade_to_label": 0.2,
         "crosses": True},
        {"sample_id": "noisy_left", "label_noisy": True, "ade": 0.3, "ade_to_label": 2.5,
         "crosses": False},
    ]
    order = [s["sample_id"] for s in choose_scenes(scenes, 4)]
    assert order == ["noisy_left", "noisy_followed", "clean_crossing", "clean_far"]
    assert len(choose_scenes(scenes, 2)) == 2


def test_footprint_band_of_a_straight_path():
    path = np.stack([np.arange(5.0), np.zeros(5)], axis=1)
    band = visualize.footprint_band(path, 0.9)
    assert band.shape == (10, 2)
    np.testing.assert_allclose(band[:5, 1], 0.9)
    np.testing.assert_allclose(band[5:, 1], -0.9)


def test_without_matplotlib_the_message_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ImportError, match=r"srdrl\[plot\]"):
        visualize.pyplot()


def test_training_curves_keep_the_latest_row_per_step(run_dir):
    rows = visualize.read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("case", ["no_model_dir", "not_a_checkpoint", "run_dir_as_model",
                                  "no_data", "no_train_data", "no_metrics"])
def test_bad_inputs_name_the_path(run_dir, tmp_path, case):
    args = _args(run_dir)
    missing = str(tmp_path / "missing")
    if case == "no_model_dir":
        args[1] = missing
    elif case == "not_a_checkpoint":
        args[1] = str(tmp_path)
        missing = "not a policy checkpoint"
    elif case == "run_dir_as_model":
        args[1] = str(run_dir)
        missing = f"the trained policy is in {run_dir / 'policy'}"
    elif case == "no_data":
        args[3] = missing
    elif case == "no_train_data":
        args += ["--train_data_path", missing]
    else:
        args += ["--metrics", missing]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert "srdrl-eval: error:" in str(e.value) and missing in str(e.value)


def test_data_without_evaluation_fields(run_dir, tmp_path):
    record = json.loads((run_dir / "data" / "val.jsonl").read_text().splitlines()[0])
    keep = {"frame_paths", "reasoning", "trajectory", "camera", "ego_history_xyz"}
    record = {k: v for k, v in record.items() if k in keep}
    record["frame_paths"] = [str(run_dir / "data" / p) for p in record["frame_paths"]]
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps(record) + "\n")
    args = _args(run_dir, "--train_data_path", "none")
    args[3] = str(path)
    with pytest.raises(SystemExit, match="no evaluation fields"):
        main(args)
