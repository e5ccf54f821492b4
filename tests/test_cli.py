"""The shared command line (srdrl.cli): config files, overrides, errors, spellings, help."""

import dataclasses
import json

import pytest

from srdrl import evaluate, train
from srdrl.cli import parse_config
from srdrl.config import EvalConfig, ObjectiveConfig, RewardConfig, TrainConfig, field_docs
from srdrl.data import synthetic
from srdrl.data.synthetic import SyntheticDataConfig

EVAL = (EvalConfig, RewardConfig)


def _parse(argv, classes=EVAL):
    return parse_config(classes, argv, prog="srdrl-test", description="test")


# the same values as YAML and as JSON; YAML 1.1 reads 1e-2 as a string, which the float
# field still takes
YAML = """\
policy: runs/x/policy
data_path: data/val.jsonl
num_samples: 3
pictures: 0
metrics: null
danger_threshold: 0.45
unsafe_threshold: 1e-2
use_trust_gate: false
scoring_backend: reference
"""
FILE_VALUES = {"policy": "runs/x/policy", "data_path": "data/val.jsonl", "num_samples": 3,
               "pictures": 0, "metrics": None, "danger_threshold": 0.45,
               "unsafe_threshold": 0.01, "use_trust_gate": False,
               "scoring_backend": "reference"}


def _write(tmp_path, suffix):
    path = tmp_path / f"eval{suffix}"
    path.write_text(YAML if suffix != ".json" else json.dumps(FILE_VALUES))
    return path


def _values(cfgs):
    merged = {k: v for c in cfgs for k, v in dataclasses.asdict(c).items()}
    return {k: merged[k] for k in FILE_VALUES}


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_config_file_gives_the_values(tmp_path, suffix):
    cfg, rewards = _parse(["--config", str(_write(tmp_path, suffix))])
    assert _values((cfg, rewards)) == FILE_VALUES
    # fields the file leaves out keep their defaults
    assert cfg.batch_size == 8 and rewards.gt_trust_min == RewardConfig.gt_trust_min


@pytest.mark.parametrize("before", [False, True], ids=["flags_after", "flags_before"])
def test_command_line_overrides_the_file(tmp_path, before):
    flags = ["--num_samples", "5", "--use_trust_gate", "--danger-threshold", "0.6",
             "--policy", "other/policy"]
    config = ["--config", str(_write(tmp_path, ".yaml"))]
    cfg, rewards = _parse(flags + config if before else config + flags)
    expected = {**FILE_VALUES, "num_samples": 5, "use_trust_gate": True,
                "danger_threshold": 0.6, "policy": "other/policy"}
    assert _values((cfg, rewards)) == expected


def test_without_a_file_required_flags_stay_required(capsys):
    with pytest.raises(SystemExit) as e:
        _parse(["--data_path", "x.jsonl"])
    assert e.value.code == 2 and "--policy" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ("policy: p\nnum_sampels: 3\n", "unknown key 'num_sampels'"),
    ("policy: p\nnum-samples: 3\n", "unknown key 'num-samples' (did you mean 'num_samples'?)"),
    ("num_samples: 2.5\n", "num_samples: expected int, got 2.5"),
    ("policy: null\n", "policy: null is not allowed"),
    ("use_trust_gate: 3\n", "use_trust_gate: expected bool, got 3"),
    ("- policy\n", "expected a mapping"),
    ("policy: [p\n", "line 2: not valid YAML"),
])
def test_bad_file_is_a_usage_error_naming_file_and_key(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        _parse(["--config", str(path), "--data_path", "d"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(path) in err and message in err, err


@pytest.mark.parametrize("name", ["missing.yaml", "config.toml"])
def test_missing_or_unknown_kind_of_file(tmp_path, capsys, name):
    (tmp_path / "config.toml").write_text("policy = 'p'\n")
    with pytest.raises(SystemExit) as e:
        _parse(["--config", str(tmp_path / name)])
    assert e.value.code == 2 and name in capsys.readouterr().err


def test_post_init_error_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        _parse(["--policy", "p", "--data_path", "d", "--num_samples", "0"])
    assert e.value.code == 2 and "num_samples and batch_size must be >= 1" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # RewardConfig's own check, through the same path
        _parse(["--policy", "p", "--data_path", "d", "--scoring_backend", "cuda"])
    assert e.value.code == 2 and "scoring_backend must be" in capsys.readouterr().err


def test_an_optional_bool_flag_alone_means_true(capsys):
    from srdrl.train import parse_args

    assert parse_args([])[0].zero3_gather_vlm_layers_whole is True  # unset: decided
    assert parse_args(["--gradient_checkpointing"])[0].zero3_gather_vlm_layers_whole is False
    assert parse_args(["--zero3_gather_vlm_layers_whole", "false"])[0] \
        .zero3_gather_vlm_layers_whole is False
    with pytest.raises(SystemExit) as e:  # a bare flag is an explicit true
        parse_args(["--zero3_gather_vlm_layers_whole", "--gradient_checkpointing"])
    assert e.value.code == 2 and "cannot be used with gradient_checkpointing" in \
        capsys.readouterr().err


def test_dash_and_underscore_spellings_are_the_same_flag():
    under = _parse(["--policy", "p", "--data_path", "d", "--num_samples", "7",
                    "--gt_trust_min", "0.2", "--no_use_trust_gate"])
    dash = _parse(["--policy", "p", "--data-path", "d", "--num-samples", "7",
                   "--gt-trust-min", "0.2", "--no-use-trust-gate"])
    assert under == dash
    assert under[0].num_samples == 7 and under[1].gt_trust_min == 0.2
    assert under[1].use_trust_gate is False


def test_old_flag_names_are_refused(capsys):
    """--out, --model and --backend were renamed; no prefix matching lets them through."""
    for old in ("--out", "--model", "--backend"):
        with pytest.raises(SystemExit) as e:
            _parse(["--policy", "p", "--data_path", "d", old, "x"])
        assert e.value.code == 2 and old in capsys.readouterr().err


CLIS = {
    "srdrl-train": (train.main, (TrainConfig, ObjectiveConfig, RewardConfig)),
    "srdrl-eval": (evaluate.main, (EvalConfig, RewardConfig)),
    "srdrl-make-data": (synthetic.main, (SyntheticDataConfig,)),
}


def _squeeze(text: str) -> str:
    return "".join(text.split())  # argparse wraps (and may break at hyphens) at any width


@pytest.mark.parametrize("cli", list(CLIS))
def test_help_documents_every_flag(cli, capsys):
    main, classes = CLIS[cli]
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = _squeeze(capsys.readouterr().out)
    for cls in classes:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f.name in docs, f"{cls.__name__}.{f.name} has no docstring"
            flag = f"--{f.name}"
            dashed = f"--{f.name.replace('_', '-')}"
            assert f"{flag}{f.name.upper()}" in text or f"{flag}[{f.name.upper()}]" in text, \
                (cli, flag)
            assert f"{dashed}" in text, (cli, dashed)
            assert _squeeze(docs[f.name]) in text, (cli, f.name)
    if cli != "srdrl-train":  # srdrl.train is converted to parse_config separately
        assert "--configPATH" in text


def test_make_data_from_a_config_file(tmp_path):
    out = tmp_path / "data"
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"output_dir": str(out), "num_scenes": 3, "width": 32,
                                "height": 24, "label_noise": 1.0}))
    synthetic.main(["--config", str(path), "--seed", "5"])
    train_rows = (out / "train.jsonl").read_text().splitlines()
    val_rows = (out / "val.jsonl").read_text().splitlines()
    assert len(train_rows) + len(val_rows) == 3
    assert json.loads(train_rows[0])["camera"]["width"] == 32
    # the same scenes as the flags alone give
    synthetic.main(["--output_dir", str(tmp_path / "flags"), "--num_scenes", "3", "--width",
                    "32", "--height", "24", "--label_noise", "1", "--seed", "5"])
    assert (tmp_path / "flags" / "train.jsonl").read_text() == "\n".join(train_rows) + "\n"
