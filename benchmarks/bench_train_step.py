"""Benchmark: one SRD-RL training step at the `bench` policy, split into its phases.

Variants, each a fresh DeepSpeed engine on the same batch (bf16, torch AdamW, 1 GPU):

  zero2_graph   ZeRO-2, sampler replayed from a CUDA graph, Triton scoring (the default)
  zero2_eager   ZeRO-2, eager sampler, Triton scoring
  zero3         ZeRO-3, parameters gathered, eager sampler before the forward pass
  original      the original pipeline's choices: one candidate at a time (each sample
                re-encodes its scene and runs its own Euler loop at batch 1) and the
                OpenCV reference loop for scoring, ZeRO-2

Per variant: median step time (``common.time_cuda``: CUDA events around forward + backward
+ optimiser step, after warm-up; the VLM inputs are built outside the step, as the
DataLoader's workers do in training), the split into vlm_forward / supervised / sampling /
scoring / awr / backward / optimizer_step (CUDA events per phase, mean over the timed
steps), scenes/s and peak device memory
over the timed steps. Targets: sampling + scoring <= 25% of the step; the step >= 5x the
original pipeline; ZeRO-3 peak memory below ZeRO-2's (needs several GPUs to show: with one
rank ZeRO-3 has nothing to partition across).

    python benchmarks/bench_train_step.py [--scenes 8 --samples 4 --steps 10]

Prints the GPU, versions and a table last; writes $OUT/bench_train_step.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_info, time_cuda, training_step, write_json  # noqa: E402

VARIANTS = ("zero2_graph", "zero2_eager", "zero3", "original")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--scenes", type=int, default=8, help="B, scenes per step")
    p.add_argument("--samples", type=int, default=4, help="N, policy samples per scene")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--original-steps", type=int, default=2, help="timed steps of 'original'")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=384)
    return p.parse_args(argv)


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


def run_variant(name, args, batch, texts):
    import deepspeed

    from srdrl.config import ObjectiveConfig, RewardConfig
    from srdrl.engine import SRDRLModule
    from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer, sample_trajectories
    from srdrl.policy.model import VLM_INPUTS_KEY
    from srdrl.timing import SectionTimer

    stage = 3 if name == "zero3" else 2
    ds = {"train_micro_batch_size_per_gpu": args.scenes, "gradient_accumulation_steps": 1,
          "train_batch_size": args.scenes, "gradient_clipping": 1.0, "bf16": {"enabled": True},
          "zero_optimization": {"stage": stage},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
          "steps_per_print": 10**9}
    objective = ObjectiveConfig(num_trajectory_samples=args.samples,
                                use_cuda_graph=(name == "zero2_graph"))
    rewards = RewardConfig(scoring_backend="reference" if name == "original" else "triton")
    torch.manual_seed(0)
    config = PolicyConfig.preset(args.preset)
    module = SRDRLModule(VLAPolicy(config, build_tokenizer(config, texts)), objective, rewards,
                         zero_stage=stage,
                         sampler=one_at_a_time if name == "original" else sample_trajectories)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                      config=ds)
    # As in training, the DataLoader's workers build the VLM inputs ahead of the step.
    batch = {**batch, VLM_INPUTS_KEY: module.policy.input_builder(batch)}
    timer = SectionTimer()
    one_step = training_step(engine, batch, args.scenes, timer)

    for _ in range(args.warmup):
        one_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    timer.collect()  # drop the warm-up's sections
    timed = args.original_steps if name == "original" else args.steps
    timing = time_cuda(one_step, iters=timed, warmup=0)
    phases = {k: v / timed for k, v in sorted(timer.collect().items())}  # mean ms per step
    peak = torch.cuda.max_memory_allocated()
    median = 1e3 * timing.median_s
    result = {"step_ms_median": median, "step_ms_all": [1e3 * t for t in timing.times_s],
              "phases_ms": phases, "scenes_per_s": args.scenes / timing.median_s,
              "peak_memory_gib": peak / 2**30,
              "sampling_plus_scoring_fraction":
                  (phases.get("sampling", 0) + phases.get("scoring", 0)) / median}
    engine = module = None  # free the GPU memory before the next variant
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train_step needs CUDA")
        return 1
    from srdrl.data.dataset import JsonlDataset, collate
    from srdrl.data.synthetic import SyntheticDataConfig, make_dataset
    from srdrl.engine import init_distributed

    init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(SyntheticDataConfig(output_dir=tmp, num_scenes=args.scenes + 2,
                                         width=args.width, height=args.height, seed=0),
                     progress=False)
        ds = JsonlDataset(Path(tmp) / "train.jsonl")
        batch = collate([ds[i] for i in range(args.scenes)])
        texts = [r["reasoning"] for r in ds.records]
    results = {}
    for name in args.variants:
        results[name] = run_variant(name, args, batch, texts)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "step_ms_all"}),
              flush=True)
    info = {**device_info(), "scenes": args.scenes, "samples": args.samples,
            "preset": args.preset, "image": f"{args.width}x{args.height}"}
    ratios = {}
    if "original" in results and "zero2_graph" in results:
        ratios["zero2_graph_vs_original"] = (results["original"]["step_ms_median"]
                                             / results["zero2_graph"]["step_ms_median"])
    if "zero2_eager" in results and "zero2_graph" in results:
        ratios["graph_vs_eager_step"] = (results["zero2_eager"]["step_ms_median"]
                                         / results["zero2_graph"]["step_ms_median"])
    write_json("bench_train_step.json", {"info": info, "results": results, "ratios": ratios})
    print(f"\n{info}")
    cols = ["vlm_forward", "supervised", "sampling", "scoring", "awr", "backward",
            "optimizer_step"]
    print(f"{'variant':<12} {'step ms':>9} {'scenes/s':>9} {'peak GiB':>9} {'samp+score':>10} "
          + " ".join(f"{c[:9]:>9}" for c in cols))
    for name, r in results.items():
        print(f"{name:<12} {r['step_ms_median']:9.1f} {r['scenes_per_s']:9.1f} "
              f"{r['peak_memory_gib']:9.2f} {100 * r['sampling_plus_scoring_fraction']:9.1f}% "
              + " ".join(f"{r['phases_ms'].get(c, 0.0):9.1f}" for c in cols))
    for k, v in ratios.items():
        print(f"{k}: {v:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
