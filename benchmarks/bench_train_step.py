"""Benchmark: one SRD-RL training step at the `bench` policy, split into its phases, with
the model-FLOP utilisation of each phase.

Variants, each a fresh DeepSpeed engine on the same batch (bf16, 1 GPU):

  zero2_graph   ZeRO-2, sampler replayed from a CUDA graph, Triton scoring (the default)
  zero2_eager   ZeRO-2, eager sampler, Triton scoring
  zero2_pageable  zero2_graph with the batch in pageable memory (a DataLoader without
                pin_memory; srdrl-train pins on CUDA, and so do the other variants here)
  zero2_liger   zero2_graph with --liger_kernels (Liger's RMSNorm, rotary and SwiGLU kernels)
  zero2_liger_norms, zero2_liger_swiglu  zero2_graph with only Liger's RMSNorm and rotary,
                or only its SwiGLU (which kernel costs or saves what)
  zero2_compile zero2_graph with --compile_layers (inductor on the expert's layers and the
                VLM text layers' MLPs and RMSNorms; aot_eager with --smoke)
  zero3         ZeRO-3, sampling inside the forward pass, eager (ZeRO-3's hooks gather the
                expert's parameters submodule by submodule as it runs)
  zero3_whole   zero3 gathering the expert as one unit per call
                (--zero3_gather_expert_whole)
  zero3_prefetch  zero3 with ZeRO-3's prefetch and reuse knobs opened up
                (ZERO3_PREFETCH: a 5e8-element prefetch bucket, gathered parameters kept
                live and reused up to 1e10 elements apart, so the Euler loop's ten passes
                over the expert need not gather it again)
  zero3_whole_prefetch  zero3_whole with the prefetch knobs of zero3_prefetch
  zero3_layers  zero3_whole with each VLM decoder layer and vision block gathered as one
                unit too (--zero3_gather_vlm_layers_whole), sampling eagerly through
                ZeRO-3's hooks (--no_zero3_sampling_replica)
  zero3_layers_prefetch  zero3_layers with the prefetch knobs of zero3_prefetch
  zero3_layers_replica  zero3_layers sampling from a copy of the expert refreshed before
                each step, its Euler loop replayed from a CUDA graph
                (--zero3_sampling_replica; with the layers whole, srdrl-train's ZeRO-3
                default)
  original      the original pipeline's choices: one candidate at a time (each sample
                re-encodes its scene and runs its own Euler loop at batch 1) and the
                OpenCV reference loop for scoring, ZeRO-2

Each run is a fresh Python process (``--in_process`` runs them one after another in one
process, where what earlier DeepSpeed engines left behind can slow a later run: the step is
bound by host work), each under every optimiser of ``--optimizers`` (srdrl.optimizer:
DeepSpeed's AdamW from the config, torch_adam; torch's fused AdamW as a client optimiser),
``original`` under the first only. Results are named ``variant/optimizer``.

Per run: median step time (``common.time_steps``: CUDA events around forward + backward +
optimiser step, after warm-up; the VLM inputs are built outside the step, as the
DataLoader's workers do in training), scenes/s, peak device memory (above what earlier
variants left allocated), and per phase

  prefix_encode   the VLM's teacher-forced pass (section vlm_forward)
  sampling        the N flow-matching candidates per scene (generation + sampling)
  scoring         rewards of label + candidates
  loss_forward    supervised flow matching, consistency and the AWR term (supervised + awr)
  backward        engine.backward
  optimizer_step  engine.step
  other           the step's median minus the phases' (DeepSpeed's forward wrapper, the
                  metrics' host sync, launch gaps)

the median ms over the timed steps (``srdrl.timing.SectionTimer``, CUDA events), the FLOPs
of one untimed step after the timed ones (``srdrl.timing.FlopSections``, i.e.
``torch.utils.flop_counter.FlopCounterMode``, eager sampler), TFLOP/s, and MFU: FLOPs /
time / the bf16 matmul rate measured in the same run (``common.bf16_matmul_peak``), also for
the whole step. FlopCounterMode counts matmul-class operations only, so scoring (Triton)
and the optimiser step (elementwise) show 0 FLOPs: their limit is bandwidth, not MFU.
With ``--profile``, one more step per run under ``torch.profiler``
(``srdrl.timing.KernelSections``, the device synchronised at each section's edges): per
phase the kernels, copies and memsets run, the host's launch calls (a CUDA-graph replay is
one), the time the GPU was busy, the share it sat idle waiting for the host (host-bound
when high), the top kernels, the aten operators called most often, and the MFU the step's
kernels would reach if the GPU never waited.
Targets: sampling + scoring <= 25% of the step; the step >= 5x the original pipeline;
ZeRO-3 peak memory below ZeRO-2's (needs several GPUs to show: with one rank ZeRO-3 has
nothing to partition across).

    python benchmarks/bench_train_step.py [--scenes 8 --samples 4 --steps 10]
    python benchmarks/bench_train_step.py --profile  # + kernels per phase (what bounds it)
    python benchmarks/bench_train_step.py --smoke   # tiny policy on CPU: checks it runs;
                                                    # its wall-clock figures mean nothing

Prints the GPU, versions and tables last; writes $OUT/bench_train_step.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    bf16_matmul_peak,
    count_step_flops,
    device_info,
    time_steps,
    training_step,
    write_json,
)

from srdrl.config import OPTIMIZERS  # noqa: E402

VARIANTS = ("zero2_graph", "zero2_eager", "zero2_pageable", "zero2_liger", "zero2_liger_norms",
            "zero2_liger_swiglu", "zero2_compile", "zero3", "zero3_whole", "zero3_prefetch",
            "zero3_whole_prefetch", "zero3_layers", "zero3_layers_prefetch",
            "zero3_layers_replica", "original")
LIGER_VARIANTS = {"zero2_liger": ("rms_norm", "rope", "swiglu"),
                  "zero2_liger_norms": ("rms_norm", "rope"), "zero2_liger_swiglu": ("swiglu",)}
ZERO3_LAYERS_VARIANTS = ("zero3_layers", "zero3_layers_prefetch", "zero3_layers_replica")
ZERO3_WHOLE_VARIANTS = ("zero3_whole", "zero3_whole_prefetch", *ZERO3_LAYERS_VARIANTS)
ZERO3_PREFETCH_VARIANTS = ("zero3_prefetch", "zero3_whole_prefetch", "zero3_layers_prefetch")
ZERO3_PREFETCH = {"stage3_prefetch_bucket_size": 5 * 10**8,
                  "stage3_max_live_parameters": 10**10, "stage3_max_reuse_distance": 10**10}
PHASES = {"prefix_encode": ("vlm_forward",), "sampling": ("generation", "sampling"),
          "scoring": ("scoring",), "loss_forward": ("supervised", "awr"),
          "backward": ("backward",), "optimizer_step": ("optimizer_step",)}
"""Reported phase -> the srdrl_loss / train_step sections it sums."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--scenes", type=int, default=8, help="B, scenes per step")
    p.add_argument("--samples", type=int, default=4, help="N, policy samples per scene")
    p.add_argument("--flow_steps", type=int, default=10, help="Euler steps of the sampler")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--original-steps", type=int, default=2, help="timed steps of 'original'")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--profile", action="store_true",
                   help="one more step per run under torch.profiler: per phase the kernels "
                        "launched, the GPU-busy time and the top kernels (what bounds it)")
    p.add_argument("--in_process", action="store_true",
                   help="every run in this process, one after another (later runs then share "
                        "the process with what earlier DeepSpeed engines left behind)")
    p.add_argument("--run_one", help=argparse.SUPPRESS)  # VARIANT/OPTIMIZER, for the parent
    p.add_argument("--peak_flops", type=float, help=argparse.SUPPRESS)
    p.add_argument("--result_file", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true",
                   help="tiny policy on CPU, small images, wall clock (checks that it runs)")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.scenes, args.samples, args.flow_steps = "tiny", 2, 2, 2
        args.steps, args.original_steps, args.warmup = 2, 1, 1
        args.width, args.height = 128, 96
        if set(LIGER_VARIANTS) & set(args.variants):  # Liger's kernels are CUDA-only
            print("--smoke: the zero2_liger variants left out (Liger's kernels need CUDA)")
            args.variants = [v for v in args.variants if v not in LIGER_VARIANTS]
    return args


def one_at_a_time(policy, batch, num_samples, steps, noise_scale_step, generator,
                  use_cuda_graph, prefix=None):
    """The original prototype's sampler: every candidate re-encodes its scene and runs its
    own Euler loop at batch 1."""
    from srdrl.policy import sample_trajectories

    acts, trajs = [], []
    for b in range(len(batch["reasoning_text"])):
        scene = {k: v[b:b + 1] for k, v in batch.items()
                 if isinstance(v, (torch.Tensor, list))}  # its VLM inputs are rebuilt
        for _ in range(num_samples):
            a, t = sample_trajectories(policy, scene, 1, steps=steps, use_cuda_graph=False)
            acts.append(a)
            trajs.append(t)
    n = num_samples
    return (torch.cat(acts).view(-1, n, *acts[0].shape[2:]),
            torch.cat(trajs).view(-1, n, *trajs[0].shape[2:]))


def phase_rows(per_step: list[dict], flops, step_ms: float, peak: float | None) -> dict:
    """Per phase (and 'other', 'total'): median ms, FLOPs, TFLOP/s and MFU against ``peak``
    (FLOP/s; None on CPU)."""
    def row(ms: float, count: int) -> dict:
        rate = count / (ms * 1e-3) if ms > 0 else None
        return {"ms_median": ms, "flops": count, "tflops_per_s": rate and rate / 1e12,
                "mfu": rate / peak if rate is not None and peak else None}

    rows = {phase: row(statistics.median(sum(s.get(k, 0.0) for k in sections)
                                         for s in per_step),
                       sum(flops.per_section.get(k, 0) for k in sections))
            for phase, sections in PHASES.items()}
    rows["other"] = row(max(step_ms - sum(r["ms_median"] for r in rows.values()), 0.0),
                        flops.total - sum(r["flops"] for r in rows.values()))
    rows["total"] = row(step_ms, flops.total)
    return rows


def phase_kernel_rows(sections: dict) -> dict:
    """``KernelSections.summary()`` (per srdrl section) summed into the reported phases
    and a ``total`` over every section: wall and GPU-busy ms, launches, idle share, and the
    top kernels of its sections."""
    rows = {}
    for phase, names in [*PHASES.items(), ("total", tuple(sections))]:
        parts = [sections[n] for n in names if n in sections]
        if not parts:
            continue
        wall = sum(p["wall_ms"] for p in parts)
        busy = sum(p["gpu_busy_ms"] for p in parts)
        top = sorted((t for p in parts for t in p["top"]), key=lambda t: -t["ms"])[:5]
        host_ops: dict[str, int] = {}
        for part in parts:
            for op in part.get("host_ops", ()):
                host_ops[op["op"]] = host_ops.get(op["op"], 0) + op["count"]
        rows[phase] = {"wall_ms": wall, "gpu_busy_ms": busy,
                       "launches": sum(p["launches"] for p in parts),
                       "host_launches": sum(p.get("host_launches", 0) for p in parts),
                       "host_ops": sorted(({"op": k, "count": c} for k, c in host_ops.items()),
                                          key=lambda o: -o["count"])[:5],
                       "gpu_idle_fraction": 1.0 - busy / wall if wall > 0 else None,
                       "top": top}
    return rows


def run_variant(name, optimizer, args, batch, texts, peak):
    from srdrl.config import ObjectiveConfig, RewardConfig
    from srdrl.engine import SRDRLModule, initialize_engine
    from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer, sample_trajectories
    from srdrl.policy.model import VLM_INPUTS_KEY
    from srdrl.timing import KernelSections, SectionTimer

    cuda = torch.cuda.is_available()
    # What earlier variants in this process left allocated (DeepSpeed keeps references to
    # its engines); subtracted so each variant's peak is its own.
    resident = torch.cuda.memory_allocated() if cuda else 0
    stage = 3 if name.startswith("zero3") else 2
    ds = {"train_micro_batch_size_per_gpu": args.scenes, "gradient_accumulation_steps": 1,
          "train_batch_size": args.scenes, "gradient_clipping": 1.0, "bf16": {"enabled": cuda},
          "zero_optimization": {"stage": stage,
                                **(ZERO3_PREFETCH if name in ZERO3_PREFETCH_VARIANTS else {})},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.95],
                                                    "eps": 1e-8, "weight_decay": 0.01,
                                                    "torch_adam": True}},
          "steps_per_print": 10**9}
    objective = ObjectiveConfig(num_trajectory_samples=args.samples, flow_steps=args.flow_steps,
                                use_cuda_graph=name in ("zero2_graph", "zero2_pageable",
                                                        "zero2_compile", "zero3_layers_replica")
                                or name in LIGER_VARIANTS)
    backend = "reference" if name == "original" else ("triton" if cuda else "kornia")
    rewards = RewardConfig(scoring_backend=backend)
    torch.manual_seed(0)
    config = PolicyConfig.preset(args.preset)
    module = SRDRLModule(VLAPolicy(config, build_tokenizer(config, texts)), objective, rewards,
                         zero_stage=stage,
                         sampler=one_at_a_time if name == "original" else sample_trajectories,
                         zero3_gather_expert_whole=name in ZERO3_WHOLE_VARIANTS,
                         zero3_gather_vlm_layers_whole=name in ZERO3_LAYERS_VARIANTS,
                         zero3_sampling_replica=name == "zero3_layers_replica")
    if name in LIGER_VARIANTS:
        from srdrl.policy.fused_kernels import apply_liger_kernels
        apply_liger_kernels(module.policy.cuda(), LIGER_VARIANTS[name])
    if name == "zero2_compile":
        from srdrl.policy.compiled_layers import compile_policy_layers
        compile_policy_layers(module.policy, "inductor" if cuda else "aot_eager")
    engine, _ = initialize_engine(module, ds, optimizer)
    # As in training, the DataLoader's workers build the VLM inputs ahead of the step, and
    # on CUDA it pins them (DataLoader(pin_memory=True)).
    batch = {**batch, VLM_INPUTS_KEY: module.policy.input_builder(batch)}
    if cuda and name != "zero2_pageable":
        batch = {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in batch.items()}
    timer = SectionTimer(cuda=cuda)
    one_step = training_step(engine, batch, args.scenes, timer)

    for _ in range(args.warmup):
        one_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer.collect()  # drop the warm-up's sections
    timing, per_step = time_steps(one_step, timer,
                                  args.original_steps if name == "original" else args.steps)
    peak_memory = (torch.cuda.max_memory_allocated() - resident) / 2**30 if cuda else None
    flops = count_step_flops(module, one_step)  # one more, untimed, eager step
    kernels = None
    if args.profile:  # one more step, device-synchronised at each section's edges
        with KernelSections() as profiled:
            one_step(profiled)
        kernels = phase_kernel_rows(profiled.summary())
        busy = kernels.get("total", {}).get("gpu_busy_ms")
        # the MFU this step's kernels would give if the GPU never waited for the host
        kernels["total"]["mfu_if_never_idle"] = (
            flops.total / (busy * 1e-3) / peak if busy and peak else None)
    median = 1e3 * timing.median_s
    phases = phase_rows(per_step, flops, median, peak)
    result = {"step_ms_median": median, "step_ms_all": [1e3 * t for t in timing.times_s],
              "timing": "cuda events" if cuda else "wall clock (smoke: not a result)",
              "phases": phases, "sections_ms_per_step": per_step, "kernels": kernels,
              "scenes_per_s": args.scenes / timing.median_s, "peak_memory_gib": peak_memory,
              "resident_before_variant_gib": resident / 2**30 if cuda else None,
              "sampling_plus_scoring_fraction":
                  (phases["sampling"]["ms_median"] + phases["scoring"]["ms_median"]) / median}
    engine = module = None  # free the GPU memory before the next variant
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def runs(args) -> list[tuple[str, str]]:
    return [(v, o) for v in args.variants
            for o in (args.optimizers[:1] if v == "original" else args.optimizers)]


def ratios(results: dict) -> dict:
    out = {}

    def step(key):
        return results[key]["step_ms_median"] if key in results else None

    first = next(iter(results)).split("/")[1]
    for base, other, label in [("original", "zero2_graph", "zero2_graph_vs_original"),
                               ("zero2_eager", "zero2_graph", "graph_vs_eager_step"),
                               ("zero2_pageable", "zero2_graph", "pinned_vs_pageable_step"),
                               ("zero2_graph", "zero2_liger", "liger_vs_unfused_step"),
                               ("zero2_graph", "zero2_liger_norms", "liger_norms_vs_unfused_step"),
                               ("zero2_graph", "zero2_liger_swiglu",
                                "liger_swiglu_vs_unfused_step"),
                               ("zero2_graph", "zero2_compile", "compile_vs_eager_layers_step"),
                               ("zero3", "zero2_graph", "zero3_over_zero2_step"),
                               ("zero3_prefetch", "zero2_graph", "zero3_prefetch_over_zero2_step"),
                               ("zero3", "zero3_prefetch", "zero3_prefetch_vs_zero3_step"),
                               ("zero3", "zero3_whole", "zero3_whole_vs_per_module_step"),
                               ("zero3_whole_prefetch", "zero2_graph",
                                "zero3_whole_prefetch_over_zero2_step"),
                               ("zero3_whole", "zero3_layers", "zero3_layers_vs_whole_step"),
                               ("zero3_layers", "zero2_graph", "zero3_layers_over_zero2_step"),
                               ("zero3_layers_prefetch", "zero2_graph",
                                "zero3_layers_prefetch_over_zero2_step"),
                               ("zero3_layers", "zero3_layers_replica",
                                "zero3_replica_vs_layers_step"),
                               ("zero3_layers_replica", "zero2_graph",
                                "zero3_layers_replica_over_zero2_step")]:
        a, b = step(f"{base}/{first}"), step(f"{other}/{first}")
        if a and b:
            out[label] = a / b
    for variant in VARIANTS:
        a, b = (results.get(f"{variant}/{o}") for o in OPTIMIZERS)
        if a and b:
            out[f"{variant}_fused_vs_deepspeed_step"] = a["step_ms_median"] / b["step_ms_median"]
            out[f"{variant}_fused_vs_deepspeed_optimizer_step"] = (
                a["phases"]["optimizer_step"]["ms_median"]
                / max(b["phases"]["optimizer_step"]["ms_median"], 1e-9))
    return out


def print_tables(results: dict, peak: float | None) -> None:
    cols = list(PHASES) + ["other"]
    print(f"{'run':<30} {'step ms':>9} {'scenes/s':>9} {'peak GiB':>9} {'samp+score':>10} "
          f"{'MFU':>6} " + " ".join(f"{c[:10]:>10}" for c in cols))
    for name, r in results.items():
        mem = r["peak_memory_gib"]
        mfu = r["phases"]["total"]["mfu"]
        print(f"{name:<30} {r['step_ms_median']:9.1f} {r['scenes_per_s']:9.1f} "
              f"{mem if mem is not None else float('nan'):9.2f} "
              f"{100 * r['sampling_plus_scoring_fraction']:9.1f}% "
              f"{100 * mfu if mfu is not None else float('nan'):5.1f}% "
              + " ".join(f"{r['phases'][c]['ms_median']:10.1f}" for c in cols))
    print(f"\nper phase: median ms / GFLOP counted / MFU % (bf16 matmul peak "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s measured in this run)")
    for name, r in results.items():
        cells = []
        for c in cols + ["total"]:
            row = r["phases"][c]
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
            cells.append(f"{c} {row['ms_median']:.1f}/{row['flops'] / 1e9:.1f}/{mfu}")
        print(f"{name:<30} " + "  ".join(cells))
    profiled = {name: r["kernels"] for name, r in results.items() if r.get("kernels")}
    if profiled:
        print("\nper phase, one profiled step (synchronised at section edges): wall ms / "
              "GPU-busy ms / kernels run / host launch calls / GPU idle %; top kernels by "
              "time; host ops most often called")
    for name, rows in profiled.items():
        print(name)
        for phase, row in rows.items():
            idle = row["gpu_idle_fraction"]
            top = "; ".join(f"{t['kernel'][:60]} {t['ms']:.2f}ms x{t['count']}"
                            for t in row["top"][:3])
            ops = ", ".join(f"{o['op']} x{o['count']}" for o in row["host_ops"][:3])
            print(f"  {phase:<15} {row['wall_ms']:8.1f} {row['gpu_busy_ms']:8.1f} "
                  f"{row['launches']:6d} {row['host_launches']:6d} "
                  f"{100 * idle if idle is not None else float('nan'):5.1f}%  {top}\n"
                  f"  {'':<15} host: {ops}")
        never_idle = rows.get("total", {}).get("mfu_if_never_idle")
        if never_idle is not None:
            print(f"  MFU of these kernels if the GPU never waited for the host: "
                  f"{100 * never_idle:.1f}%")


def synthetic_batch(args) -> tuple[dict, list[str]]:
    """The benchmark's batch (B scenes) and the reasoning texts the tokenizer is built on."""
    from srdrl.data.dataset import JsonlDataset, collate
    from srdrl.data.synthetic import SyntheticDataConfig, make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        # a tenth goes to the validation split: enough train scenes for one batch
        make_dataset(SyntheticDataConfig(output_dir=tmp, num_scenes=2 * args.scenes + 2,
                                         width=args.width, height=args.height, seed=0),
                     progress=False)
        ds = JsonlDataset(Path(tmp) / "train.jsonl")
        return collate([ds[i] for i in range(args.scenes)]), [r["reasoning"] for r in ds.records]


def in_own_process(key: str, args, peak: float | None) -> dict:
    """``run_variant`` of ``key`` in a fresh Python process (nothing an earlier engine left
    behind, allocated memory or objects the garbage collector walks, slows it)."""
    passed = ["--preset", args.preset, "--scenes", str(args.scenes), "--samples",
              str(args.samples), "--flow_steps", str(args.flow_steps), "--steps",
              str(args.steps), "--original-steps", str(args.original_steps), "--warmup",
              str(args.warmup), "--width", str(args.width), "--height", str(args.height),
              *(["--profile"] if args.profile else []), *(["--smoke"] if args.smoke else [])]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        run = subprocess.run([sys.executable, str(Path(__file__).resolve()), *passed,
                              "--run_one", key, "--peak_flops", repr(peak or 0.0),
                              "--result_file", str(out)], env=env)
        if run.returncode != 0:
            raise RuntimeError(f"bench_train_step: the run {key} failed (exit code "
                               f"{run.returncode}; its output is above)")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:  # before anything asks CUDA: the engine then places everything on the CPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        print("bench_train_step needs CUDA (or --smoke)")
        return 1
    from srdrl.engine import init_distributed

    if args.run_one:  # one run, for a parent process (see in_own_process)
        init_distributed()
        batch, texts = synthetic_batch(args)
        variant, optimizer = args.run_one.split("/")
        result = run_variant(variant, optimizer, args, batch, texts, args.peak_flops or None)
        Path(args.result_file).write_text(json.dumps(result))
        return 0
    peak = bf16_matmul_peak() if torch.cuda.is_available() else None
    if args.in_process:
        init_distributed()
        batch, texts = synthetic_batch(args)
    results = {}
    for variant, optimizer in runs(args):
        key = f"{variant}/{optimizer}"
        results[key] = (run_variant(variant, optimizer, args, batch, texts, peak)
                        if args.in_process else in_own_process(key, args, peak))
        print(key, json.dumps({k: v for k, v in results[key].items()
                               if k not in ("step_ms_all", "sections_ms_per_step", "kernels")}),
              flush=True)
    info = {**device_info(), "scenes": args.scenes, "samples": args.samples,
            "flow_steps": args.flow_steps, "preset": args.preset,
            "image": f"{args.width}x{args.height}", "smoke": args.smoke,
            "bf16_matmul_peak_tflops_per_s": peak / 1e12 if peak else None}
    found = ratios(results)
    write_json("bench_train_step.json", {"info": info, "results": results, "ratios": found})
    print(f"\n{info}")
    print_tables(results, peak)
    for k, v in found.items():
        print(f"{k}: {v:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
