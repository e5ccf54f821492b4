"""The train-step benchmark's FLOP accounting: FlopSections per section, phase rows, and a
smoke run on CPU (its times mean nothing; its FLOPs and structure are checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from srdrl.timing import FlopSections, KernelSections, host_ops_in_windows, kernels_in_windows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_train_step  # noqa: E402


def test_flop_sections_attribute_matmuls_to_their_section():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with FlopSections() as flops:
        with flops.section("mm"):
            a @ b
        with flops.section("elementwise"):
            a * 2 + 1
        with flops.section("mm"):
            a @ b
        a @ b  # outside any section: in the total only
    assert flops.per_section == {"mm": 2 * 2 * 8 * 16 * 4, "elementwise": 0}
    assert flops.total == 3 * 2 * 8 * 16 * 4


def test_kernels_in_windows_counts_union_of_busy_time_and_ranks_kernels():
    windows = [("fwd", 0.0, 1000.0), ("opt", 1000.0, 1500.0), ("fwd", 2000.0, 2200.0)]
    kernels = [("gemm", 100.0, 400.0), ("gemm", 300.0, 500.0),  # overlap: 400 us busy
               ("add", 900.0, 1100.0),  # starts in fwd, runs past its end
               ("adam", 1200.0, 1300.0), ("copy", 1499.0, 1500.0),
               ("gemm", 2050.0, 2150.0), ("late", 1700.0, 1800.0)]  # between windows
    out = kernels_in_windows(windows, kernels, top=2)
    assert set(out) == {"fwd", "opt"}
    fwd, opt = out["fwd"], out["opt"]
    assert fwd["wall_ms"] == pytest.approx(1.2) and fwd["launches"] == 4
    assert fwd["gpu_busy_ms"] == pytest.approx((400 + 200 + 100) / 1e3)
    assert fwd["gpu_idle_fraction"] == pytest.approx(1 - 700 / 1200)
    assert fwd["top"] == [{"kernel": "gemm", "ms": pytest.approx(0.6), "count": 3},
                          {"kernel": "add", "ms": pytest.approx(0.2), "count": 1}]
    assert opt["launches"] == 2 and opt["gpu_busy_ms"] == pytest.approx(0.101)


def test_host_ops_in_windows_count_by_name_inside_each_section():
    windows = [("opt", 0.0, 10.0), ("bwd", 10.0, 20.0), ("opt", 30.0, 40.0)]
    ops = [("aten::norm", 1.0), ("aten::copy_", 2.0), ("aten::norm", 35.0),
           ("aten::mm", 15.0), ("aten::norm", 25.0)]  # the last between windows
    out = host_ops_in_windows(windows, ops, top=1)
    assert out == {"opt": [{"op": "aten::norm", "count": 2}],
                   "bwd": [{"op": "aten::mm", "count": 1}]}


def test_kernel_sections_find_their_windows_on_cpu():
    a = torch.randn(64, 64)
    with KernelSections() as kernels:
        with kernels.section("mm"):
            a @ a
        with kernels.section("add"):
            a + a
        with kernels.section("mm"):
            a @ a
    summary = kernels.summary()
    assert set(summary) == {"mm", "add"}
    assert summary["mm"]["host_ops"][0] == {"op": "aten::matmul", "count": 2}
    assert summary["add"]["host_ops"] == [{"op": "aten::add", "count": 1}]
    assert summary["add"]["host_launches"] == 0  # CPU tensors: no device work
    assert all(row["wall_ms"] > 0 for row in summary.values())
    if not torch.cuda.is_available():  # nothing runs on a device
        assert all(row["launches"] == 0 and row["gpu_idle_fraction"] == 1.0
                   for row in summary.values())


def test_phase_kernel_rows_sum_sections_into_phases():
    def section(wall, busy, launches, top):
        return {"wall_ms": wall, "gpu_busy_ms": busy, "launches": launches, "top": top,
                "host_launches": launches // 2, "host_ops": [{"op": "aten::mm", "count": 2}]}

    rows = bench_train_step.phase_kernel_rows({
        "supervised": section(2.0, 1.0, 10, [{"kernel": "a", "ms": 0.5, "count": 4}]),
        "awr": section(2.0, 0.5, 6, [{"kernel": "b", "ms": 0.4, "count": 6}]),
        "backward": section(4.0, 3.0, 40, [])})
    assert set(rows) == {"loss_forward", "backward", "total"}
    assert rows["total"]["launches"] == 56 and rows["total"]["gpu_busy_ms"] == 4.5
    assert rows["loss_forward"]["launches"] == 16
    assert rows["loss_forward"]["host_launches"] == 8
    assert rows["loss_forward"]["host_ops"] == [{"op": "aten::mm", "count": 4}]
    assert rows["loss_forward"]["gpu_idle_fraction"] == pytest.approx(1 - 1.5 / 4.0)
    assert [t["kernel"] for t in rows["loss_forward"]["top"]] == ["a", "b"]


class Counted:
    per_section = {"vlm_forward": 100, "supervised": 30, "awr": 20, "sampling": 50,
                   "backward": 300}
    total = 520


def test_phase_rows_sum_sections_and_rate_against_the_peak():
    per_step = [{"vlm_forward": 2.0, "supervised": 1.0, "awr": 1.0, "sampling": 2.0,
                 "backward": 4.0, "optimizer_step": 1.0},
                {"vlm_forward": 4.0, "supervised": 1.0, "awr": 3.0, "sampling": 2.0,
                 "backward": 4.0, "optimizer_step": 1.0},
                {"vlm_forward": 3.0, "supervised": 2.0, "awr": 2.0, "sampling": 2.0,
                 "backward": 4.0, "optimizer_step": 1.0}]
    rows = bench_train_step.phase_rows(per_step, Counted, step_ms=16.0, peak=1e6)
    assert rows["prefix_encode"]["ms_median"] == 3.0
    assert rows["loss_forward"]["ms_median"] == 4.0  # median of the per-step sums 2, 4, 4
    assert rows["loss_forward"]["flops"] == 50
    assert rows["prefix_encode"]["mfu"] == pytest.approx(100 / 3e-3 / 1e6)
    assert rows["scoring"]["flops"] == 0 and rows["scoring"]["mfu"] is None  # never timed
    assert rows["other"]["flops"] == 20
    assert rows["other"]["ms_median"] == pytest.approx(16.0 - (3 + 2 + 4 + 4 + 1))
    assert rows["total"]["mfu"] == pytest.approx(520 / 16e-3 / 1e6)
    assert bench_train_step.phase_rows(per_step, Counted, 16.0, None)["total"]["mfu"] is None


@pytest.mark.heavy
def test_smoke_run_reports_every_phase_for_both_optimizers(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OUT=str(tmp_path), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train_step.py"),
                          "--smoke", "--variants", "zero2_eager", "zero3", "zero3_whole",
                          "zero3_prefetch", "zero3_layers_replica", "zero2_liger", "--profile"],
                         env=env,
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "bench_train_step.json").read_text())
    results = report["results"]
    assert "zero2_liger variants left out" in run.stdout  # CUDA-only
    assert set(results) == {f"{v}/{o}" for v in ("zero2_eager", "zero3", "zero3_whole",
                                                 "zero3_prefetch", "zero3_layers_replica")
                            for o in ("deepspeed_adamw", "torch_fused_adamw")}
    encode = {r["phases"]["prefix_encode"]["flops"] for r in results.values()}
    assert len(encode) == 1 and encode.pop() > 0  # one encode per step, at ZeRO-2 and 3
    for r in results.values():
        phases = r["phases"]
        assert set(phases) == set(bench_train_step.PHASES) | {"other", "total"}
        assert sum(phases[p]["flops"] for p in phases if p != "total") == \
            phases["total"]["flops"]
        assert phases["backward"]["flops"] > phases["loss_forward"]["flops"] > 0
        assert phases["sampling"]["flops"] > 0 and phases["optimizer_step"]["flops"] == 0
        assert phases["total"]["mfu"] is None  # no bf16 peak without CUDA
        assert {"prefix_encode", "backward", "optimizer_step", "total"} <= set(r["kernels"])
        assert r["kernels"]["total"]["mfu_if_never_idle"] is None  # no peak without CUDA
    assert "zero3_fused_vs_deepspeed_optimizer_step" in report["ratios"]
    assert {"zero3_prefetch_vs_zero3_step", "zero3_whole_vs_per_module_step"} <= set(
        report["ratios"])
