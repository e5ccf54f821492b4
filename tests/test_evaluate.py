"""srdrl-eval: the command end to end, the gate diagnostics on known answers, bad inputs."""

import json
import sys

import numpy as np
import pytest
import torch

from srdrl import evaluate, visualize
from srdrl.config import EvalConfig, RewardConfig
from srdrl.data.dataset import JsonlDataset, collate
from srdrl.data.synthetic import SyntheticDataConfig, make_dataset
from srdrl.evaluate import (
    FrameAblation,
    LabelScores,
    auroc,
    choose_scenes,
    evaluate_policy,
    gate_diagnostics,
    gate_statistics,
    hazard_free_frames,
    main,
    over_seeds,
)
from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer
from srdrl.policy.model import VLM_INPUTS_KEY
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
    """An untrained policy writes noise until the token limit: keep that short."""
    return ["--policy", str(run / "policy"), "--data_path", str(run / "data" / "val.jsonl"),
            "--num_samples", "2", "--batch_size", "4", "--scoring_backend", "kornia",
            "--max_new_tokens", "4", "--num_seeds", "2", *extra]


FAST = {"max_new_tokens": 4}


def _in_unit(x):
    return x is None or 0.0 <= x <= 1.0


def test_cli_end_to_end(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    main(_args(run_dir, "--output_dir", str(out), "--pictures", "2"))
    printed = capsys.readouterr().out
    assert "hazard crossing rate" in printed and "trust gate on 7 training labels" in printed
    assert "columns are reasoning modes" in printed and "oracle*" in printed
    assert "* oracle: DIAGNOSTIC" in printed and "image ablation (generated reasoning)" in printed
    assert "noise seeds 0 1 (mean ±std over seeds)" in printed

    report = json.loads((out / "eval_report.json").read_text())
    assert report["train_data_path"].endswith("train.jsonl")  # found beside --data_path
    assert report["metrics_path"].endswith("metrics.jsonl")  # found beside --policy
    ev = report["evaluation"]
    assert ev["headline_mode"] == "generated" and ev["seeds"] == [0, 1]
    assert list(ev["modes"]) == ["generated", "oracle", "none"]
    assert "DIAGNOSTIC" in ev["mode_notes"]["oracle"]
    assert ev["generation"] == {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0}
    for mode, m in ev["modes"].items():
        assert OLD_REPORT_KEYS <= m.keys(), mode
        assert m["scenes"] == 3 and m["num_samples"] == 2 and m["vehicle_half_width_m"] == 0.9
        for key in ("hazard_crossing_rate", "label_hazard_crossing_rate", "actions_in_bounds",
                    "noisy_label_left_behind_rate", "hazard_crossing_rate_in_path_scenes",
                    "truth_intent_alignment_rate"):
            assert _in_unit(m[key]), (mode, key)
        assert 0 <= m["min_ade"] <= m["ade"] + 1e-9 and m["fde"] >= 0
        assert m["noisy_label_scenes"] == 1 and m["non_finite_predictions"] == 0
        assert [s["seed"] for s in m["per_seed"]] == [0, 1]
        spread = m["seed_spread"]["ade"]
        ades = [s["ade"] for s in m["per_seed"]]
        assert m["ade"] == pytest.approx(np.mean(ades))
        assert spread == pytest.approx({"std": np.std(ades), "min": min(ades), "max": max(ades)})
    # the dataset's text states the truth (a check of parser and truth together); no
    # reasoning states nothing, and nothing is there to follow
    oracle, none = ev["modes"]["oracle"], ev["modes"]["none"]
    for key in ("hazard_kind_accuracy", "hazard_side_accuracy", "manoeuvre_accuracy"):
        assert oracle[f"reasoning_{key}"] == 1.0 and none[f"reasoning_{key}"] == 0.0
    assert none["reasoning_alignment_rate"] is None and _in_unit(oracle["reasoning_alignment_rate"])
    ablation = ev["image_ablation"]
    assert set(ablation["frames"]) == {"camera", "hazard_free_road", "shuffled_frames"}
    assert "val_000009" in ablation["frames"]["hazard_free_road"]  # the one hazard-free scene
    for variant in ("hazard_free_road", "shuffled_frames"):
        assert list(ablation[variant]) == ["generated", "oracle", "none"]
        assert OLD_REPORT_KEYS <= ablation[variant]["generated"].keys()

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
    for row in rows:
        assert row["mode"] == "generated" and set(row["reasoning"]) == {"generated", "oracle",
                                                                        "none"}
        assert row["reasoning"]["none"] == "" and row["reasoning"]["oracle"]
        assert set(row["truth"]) == {"kind", "side", "manoeuvre"}

    pictures = sorted(report["pictures"])
    assert pictures == sorted(["pictures/camera_frames.png", "pictures/gate_label_safety.png",
                               "pictures/training_curves.png", "pictures/image_ablation.png",
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


def test_evaluate_policy_as_train_calls_it(run_dir, capsys):
    policy = VLAPolicy.from_pretrained(run_dir / "policy", max_reasoning_tokens=4)
    report = evaluate_policy(policy, JsonlDataset(run_dir / "data" / "val.jsonl"),
                             num_samples=2, rewards=RewardConfig())
    assert report["headline_mode"] == "generated" and report["seeds"] == [0]
    assert all(OLD_REPORT_KEYS <= m.keys() for m in report["modes"].values())
    assert report["generation"]["max_new_tokens"] == 4
    evaluate.print_summary(report)
    printed = capsys.readouterr().out
    assert "generated" in printed and "hazard crossing rate" in printed


def test_non_finite_predictions_count_as_crossing(run_dir, capsys):
    """A policy whose paths are NaN fails every scene (it used to score crossing 0.000)."""
    policy = VLAPolicy.from_pretrained(run_dir / "policy")
    with torch.no_grad():
        policy.action_out_proj.bias.fill_(float("nan"))
    report = evaluate_policy(policy, JsonlDataset(run_dir / "data" / "val.jsonl"),
                             num_samples=2, rewards=RewardConfig(), progress=False,
                             modes=("generated",), image_ablation=False, **FAST)
    generated = report["modes"]["generated"]
    assert generated["non_finite_predictions"] == generated["scenes"] == 3
    assert generated["hazard_crossing_rate"] == 1.0
    evaluate.print_summary(report)
    assert "NON-FINITE predictions (generated) 3 (counted as crossing)" in capsys.readouterr().out
    path = np.zeros((64, 3))
    assert not evaluate.crosses_any_hazard(path, [])
    path[5, 1] = np.inf
    assert evaluate.crosses_any_hazard(path, [])


def test_noise_is_per_scene_and_seed(run_dir):
    """Scene i's noise is keyed by (seed, i): the batch size changes nothing, the seed does."""
    policy = VLAPolicy.from_pretrained(run_dir / "policy")
    val = JsonlDataset(run_dir / "data" / "val.jsonl")
    options = dict(num_samples=2, progress=False, modes=("generated", "none"),
                   image_ablation=False, **FAST)
    whole = evaluate_policy(policy, val, batch_size=3, **options)["modes"]
    single = evaluate_policy(policy, val, batch_size=1, **options)["modes"]
    other = evaluate_policy(policy, val, batch_size=3, seed=1, **options)["modes"]
    for mode in ("generated", "none"):
        for key in ("ade", "fde", "min_ade"):
            assert single[mode][key] == pytest.approx(whole[mode][key], rel=1e-4), (mode, key)
        assert other[mode]["ade"] != pytest.approx(whole[mode]["ade"], rel=1e-4)


def test_frame_ablation_replaces_the_frames_the_policy_sees(run_dir):
    val = JsonlDataset(run_dir / "data" / "val.jsonl")
    batch = collate([val[i] for i in range(3)])
    batch[VLM_INPUTS_KEY] = "ready-made inputs of the real frames"
    frames = FrameAblation(val, seed=0)
    assert frames.apply(batch, "camera") is batch
    road = frames.apply(batch, "hazard_free_road")
    assert VLM_INPUTS_KEY not in road and road["reasoning_text"] == batch["reasoning_text"]
    assert all(torch.equal(road["images"][b], val[2]["images"]) for b in range(3))  # val_000009
    shuffled = frames.apply(batch, "shuffled_frames")["images"]
    sources = [next(j for j in range(3) if torch.equal(shuffled[b], batch["images"][j]))
               for b in range(3)]
    assert sorted(sources) == [0, 1, 2] and all(sources[b] != b for b in range(3))

    hazardous = JsonlDataset(run_dir / "data" / "val.jsonl")
    hazardous.records = [r for r in hazardous.records if r["eval"]["hazards"]]
    images, source = hazard_free_frames(hazardous, seed=3)
    assert source == "a rendered hazard-free road" and images.shape == val[0]["images"].shape
    assert images.dtype == torch.uint8 and images.float().std() > 5  # a picture, not a fill


def test_over_seeds_known_answer():
    per_seed = [{"scenes": 4, "ade": 1.0, "hazard_crossing_rate": 0.25, "fde": 2.0,
                 "reasoning_alignment_rate": None},
                {"scenes": 4, "ade": 3.0, "hazard_crossing_rate": 0.75, "fde": 2.0,
                 "reasoning_alignment_rate": None}]
    out = over_seeds(per_seed, [5, 6])
    assert out["scenes"] == 4 and out["ade"] == 2.0 and out["hazard_crossing_rate"] == 0.5
    assert out["reasoning_alignment_rate"] is None
    assert out["seed_spread"]["ade"] == {"std": 1.0, "min": 1.0, "max": 3.0}
    assert out["seed_spread"]["fde"] == {"std": 0.0, "min": 2.0, "max": 2.0}
    assert [s["seed"] for s in out["per_seed"]] == [5, 6]


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
    assert [s["sample_id"] for s in choose_scenes(scenes, 2)] == ["noisy_left",
                                                                 "noisy_followed"]


def test_choose_scenes_shows_wrong_labels_left_behind_and_followed():
    # margins ade_to_label - ade: 3, 1, 0, -1, -2 (the last two followed the wrong label)
    scenes = [{"sample_id": f"n{m}", "label_noisy": True, "ade": 1.0, "ade_to_label": 1.0 + m,
               "crosses": m < 0} for m in (0, 3, -2, 1, -1)]
    order = [s["sample_id"] for s in choose_scenes(scenes, 4)]
    assert order == ["n3", "n1", "n-2", "n-1"]  # most left behind, then most followed
    assert [s["sample_id"] for s in choose_scenes(scenes, 3)] == ["n3", "n1", "n-2"]


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


def test_image_ablation_chart_with_equal_seeds(tmp_path):
    """Three seeds of 0.35 average to a hair above 0.35: the whiskers must not go negative."""
    pytest.importorskip("matplotlib")
    keys = [key for key, _ in visualize.ABLATION_PANELS]
    summary = {"per_seed": [{key: 0.35 for key in keys} for _ in range(3)]}
    no_text = {"per_seed": [{**{key: 0.35 for key in keys}, keys[1]: None}] * 3}
    modes = {"generated": summary, "none": no_text}
    report = {"scenes": 5, "seeds": [0, 1, 2], "modes": modes,
              "image_ablation": {"frames": {"camera": "", "hazard_free_road": ""},
                                 "hazard_free_road": modes}}
    path = visualize.plot_image_ablation(report, tmp_path / "ablation.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


@pytest.mark.parametrize("field,value,message", [
    ("reasoning_modes", ["oracle", "dataset"], "reasoning_modes"),
    ("reasoning_modes", ["none", "none"], "reasoning_modes"),
    ("reasoning_modes", [], "reasoning_modes"),
    ("num_seeds", 0, "num_seeds"),
    ("temperature", -0.1, "temperature"),
    ("top_p", 0.0, "top_p"),
])
def test_eval_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(policy="p", data_path="d.jsonl", **{field: value})
    args = ["--policy", "p", "--data_path", "d.jsonl", "--reasoning_modes", "oracle", "generated"]
    cfg, _ = evaluate.parse_args(args)
    assert cfg.reasoning_modes == ["oracle", "generated"] and cfg.num_seeds == 3


def test_data_without_evaluation_fields(run_dir, tmp_path, capsys):
    record = json.loads((run_dir / "data" / "val.jsonl").read_text().splitlines()[0])
    keep = {"frame_paths", "reasoning", "trajectory", "camera", "ego_history_xyz"}
    record = {k: v for k, v in record.items() if k in keep}
    record["frame_paths"] = [str(run_dir / "data" / p) for p in record["frame_paths"]]
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps(record) + "\n")
    args = _args(run_dir, "--train_data_path", "none")
    args[3] = str(path)
    with pytest.raises(SystemExit) as e:  # a DataError: one line on stderr, exit code 2
        main(args)
    assert e.value.code == 2 and "no evaluation fields" in capsys.readouterr().err
