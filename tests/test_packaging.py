"""The package as a user installs it: a wheel, not the editable checkout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_the_top_level_deepspeed_config(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("srdrl-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    installed = site / "srdrl" / "ds_config.json"
    assert (site / "srdrl" / "kernels" / "path_safety_triton.py").is_file()
    assert installed.is_file() and not installed.is_symlink()
    assert json.loads(installed.read_text()) == json.loads((ROOT / "ds_config.json").read_text())
    # from an unrelated directory, the installed package (not the checkout) finds its config
    probe = ("import srdrl.engine as e; from srdrl.config import TrainConfig; "
             "ds = e.resolve_deepspeed_config(TrainConfig(), 1); "
             "print(e.DEFAULT_DEEPSPEED_CONFIG.resolve()); print(ds['zero_optimization']['stage'])")
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    where, stage = run.stdout.split()
    assert Path(where) == installed.resolve() and stage == "2"


def test_repository_root_holds_no_package_but_srdrl():
    """A package directory at the repository root is importable by its bare name whenever
    the root is on sys.path (``python -m`` run from a checkout, pytest), where it shadows
    an installed package of that name: a top-level ``kernels/`` once shadowed Hugging
    Face's ``kernels``, which transformers imports when it is installed, and every import
    of a Qwen3-VL model failed."""
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["srdrl"]
