"""Benchmark: SRD-RL training steps at the size of Alpamayo-R1-10B, with LoRA, on one GPU.

Random weights in the release's shapes: the Qwen3-VL-8B text decoder and vision tower plus
the release's action expert (sources below), built directly on the GPU in bf16. LoRA
(srdrl.policy.lora, r 8 / alpha 16 / dropout 0.05 on q/k/v/o/gate/up/down of the VLM's text
decoder and of the expert; vision tower frozen; action projections and consistency heads
trained whole), optionally with gradient checkpointing of the VLM. Steps run through
srdrl.engine (SRDRLModule + deepspeed.initialize, ZeRO-2, bf16, torch AdamW) on one
synthetic batch of B scenes with N policy samples each; the VLM inputs are built outside
the step, as the DataLoader's workers do in training.

Reports: median step time (common.time_cuda, after warm-up), the split into phases
(SectionTimer: vlm_forward, supervised, sampling, scoring, awr, backward, optimizer_step),
peak memory, model FLOPs of one step (torch.utils.flop_counter.FlopCounterMode, on an eager
step with gradient checkpointing off, so recomputation is not counted) and their rate
against the measured bf16 matmul peak (common.bf16_matmul_peak), and the memory arithmetic
of FULL fine-tuning under ZeRO-2 and ZeRO-3 on 2, 4 and 8 GPUs. Writes
$OUT/bench_real_size.json.

    python benchmarks/bench_real_size.py [--scenes 2 --samples 4 --frames 4]
    python benchmarks/bench_real_size.py --gradient_checkpointing
    python benchmarks/bench_real_size.py --smoke          # tiny shapes on CPU, wall clock

Sizes, and where each number comes from:
- Qwen3-VL-8B text decoder (hidden 4096, 36 layers, 32 heads / 8 KV heads, head_dim 128,
  MLP 12288, vocab 151936, RMSNorm eps 1e-6, M-RoPE sections 24/20/20 interleaved, rope
  theta 5e6) and vision tower (27 blocks, hidden 1152, MLP 4304, 16 heads, patch 16,
  temporal patch 2, merge 2, 2304 position embeddings, DeepStack from blocks 8, 16, 24):
  Qwen3-VL-8B's config.json (text_config: huggingface.co/Steinate/Cortex/blame/main/
  config.json, a copy of it, and Balfiky/mobthing2 config.json; vision: the GGUF metadata of
  ollama.com/library/qwen3-vl:8b-instruct-bf16; vision MLP width and position grid from the
  Qwen3-VL vision config shared across sizes, huggingface.co/quanliang/F1 config.json).
  NVlabs/alpamayo names Qwen/Qwen3-VL-8B-Instruct as vlm_name_or_path
  (finetune/sft/configs/models/ar1_base.yaml).
- Expert: the VLM's text config with the release's expert_cfg overrides (NVlabs/alpamayo
  src/alpamayo_r1/models/alpamayo_r1.py builds it that way): hidden 2048, 16 heads, MLP
  8256, so 36 layers, 8 KV heads of 128 stay the VLM's. The values are in the checkpoint's
  config.json, not in the repository; NVlabs/alpamayo pull request 107 (commit d480cb8,
  reports/stage1_progress.html and mlx_port/tests) quotes them, and they give the expert
  parameter count (2.279e9) that third-party readings of the release's safetensors report.
- Pixel budget: min_pixels 163840, max_pixels 196608 (NVlabs/alpamayo
  src/alpamayo_r1/helper.py): a 640x384 frame becomes 544x320, 170 tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
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

REAL_SIZE = dict(
    vocab_size=151936, text_hidden_size=4096, text_intermediate_size=12288, num_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, mrope_section=(24, 20, 20),
    rope_theta=5_000_000.0, rms_norm_eps=1e-6,
    vision_depth=27, vision_hidden_size=1152, vision_intermediate_size=4304,
    vision_num_heads=16, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
    num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24),
    image_min_pixels=163840, image_max_pixels=196608,
    expert_hidden_size=2048, expert_intermediate_size=8256, expert_num_attention_heads=16,
)
"""PolicyConfig values of Alpamayo-R1-10B (see the module docstring for the sources)."""
RELEASE_PARAMS = dict(vision=576.4e6, text_layers=6945.8e6, expert=2279.1e6)
"""Parameter counts a third-party reading of the release's safetensors headers reports
(the release's vocabulary is larger, 155697 rows, so embeddings are left out here)."""
ADAM_BYTES = 12
"""Per trained parameter: fp32 master weight + Adam's two fp32 moments (ZeRO's K = 12)."""
GPU_BYTES = 139 * 2**30
"""Usable memory of one H200."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenes", type=int, default=2, help="B, scenes per step")
    p.add_argument("--samples", type=int, default=4, help="N, policy samples per scene")
    p.add_argument("--frames", type=int, default=4, help="camera frames per scene")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--flow_steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--zero_stage", type=int, default=2, choices=(2, 3))
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny policy on CPU, small images, wall-clock timing (a test)")
    args = p.parse_args(argv)
    if args.smoke:
        args.scenes, args.samples, args.frames = min(args.scenes, 2), min(args.samples, 2), 1
        args.width, args.height, args.flow_steps, args.steps, args.warmup = 128, 96, 2, 2, 1
    return args


def full_finetune_memory(params: int, gpus: int, stage: int, activations: float = 0.0,
                         buckets: float = 0.0) -> dict[str, float]:
    """Bytes per GPU of FULL fine-tuning with bf16 weights and gradients and fp32 AdamW:
    ZeRO-2 keeps every weight on every GPU and splits gradients and optimizer states over
    ``gpus``; ZeRO-3 splits all three. ``step_fp32_grads``: the fp32 copy of this GPU's
    gradient partition DeepSpeed makes for the optimizer step (transient). ``activations``
    (per micro-batch, not split by ZeRO) and ``buckets`` (communication buffers) are
    passed in."""
    if stage not in (2, 3) or gpus < 1:
        raise ValueError(f"need stage 2 or 3 and gpus >= 1, got {stage}, {gpus}")
    row = {"weights": 2 * params / (gpus if stage == 3 else 1),
           "gradients": 2 * params / gpus,
           "optimizer": ADAM_BYTES * params / gpus,
           "step_fp32_grads": 4 * params / gpus,
           "buckets": buckets, "activations": activations}
    row["total"] = sum(row.values())
    return row


def zero_buffers(stage: int) -> float:
    """Bytes of DeepSpeed's default bf16 communication buffers: ZeRO-2 reduce and allgather
    buckets (5e8 elements each); ZeRO-3 reduce bucket, up to 1e9 live gathered parameters
    and a 5e7-element prefetch bucket."""
    return 2 * (5e8 + 5e8 if stage == 2 else 5e8 + 1e9 + 5e7)


def part_sizes(module) -> dict[str, int]:
    """Base (non-adapter) parameter counts of the policy's parts and the heads."""
    policy = module.policy

    def count(m):
        return sum(p.numel() for n, p in m.named_parameters() if ".lora_" not in n)

    text = policy.vlm.model.language_model
    sizes = {"vision": count(policy.vlm.model.visual), "embed_tokens": count(text.embed_tokens),
             "text_layers": count(text) - count(text.embed_tokens),
             "lm_head": count(policy.vlm.lm_head),
             "expert": count(policy.expert),
             "projections": count(policy.action_in_proj) + count(policy.action_out_proj),
             "consistency_heads": count(module.heads)}
    sizes["total"] = sum(sizes.values())
    return sizes


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)  # the training code relies on float32 defaults


def build(args, texts, device):
    """SRDRLModule with LoRA, built on ``device`` in the training dtype (no fp32 copy on
    the host first), and its DeepSpeed engine."""
    import deepspeed

    from srdrl.config import ObjectiveConfig, RewardConfig
    from srdrl.engine import SRDRLModule
    from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer
    from srdrl.policy.kv_recompute import set_vlm_gradient_checkpointing
    from srdrl.policy.lora import LoraSettings, apply_lora

    cuda = device.type == "cuda"
    config = PolicyConfig.tiny() if args.smoke else PolicyConfig(**REAL_SIZE)
    tokenizer = build_tokenizer(config, texts)
    objective = ObjectiveConfig(num_trajectory_samples=args.samples, flow_steps=args.flow_steps,
                                use_cuda_graph=cuda)
    rewards = RewardConfig(scoring_backend="auto" if cuda else "kornia")
    start = time.perf_counter()
    with default_dtype(torch.bfloat16 if cuda else torch.float32), device:
        torch.manual_seed(0)
        policy = VLAPolicy(config, tokenizer)
        counts = apply_lora(policy, LoraSettings(use_peft=True))
        module = SRDRLModule(policy, objective, rewards, zero_stage=args.zero_stage)
    if args.gradient_checkpointing:
        set_vlm_gradient_checkpointing(policy)
    build_s = time.perf_counter() - start
    ds = {"train_micro_batch_size_per_gpu": args.scenes, "gradient_accumulation_steps": 1,
          "train_batch_size": args.scenes, "gradient_clipping": 1.0,
          "bf16": {"enabled": cuda}, "zero_optimization": {"stage": args.zero_stage},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.95],
                                                    "weight_decay": 0.01, "torch_adam": True}},
          "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=ds)
    return engine, module, counts, build_s


def memory_table(sizes: dict, activations: float) -> list[dict]:
    rows = []
    for stage in (2, 3):
        for gpus in (2, 4, 8):
            row = full_finetune_memory(sizes["total"], gpus, stage, activations,
                                       zero_buffers(stage))
            rows.append({"zero_stage": stage, "gpus": gpus,
                         **{k: v / 2**30 for k, v in row.items()},
                         "fits_h200": row["total"] <= GPU_BYTES})
    return rows


def print_memory_table(rows, params: int, activations: float, scenes: int) -> None:
    print(f"\nFULL fine-tuning memory per GPU, GiB ({params / 1e9:.2f}e9 parameters; bf16 "
          f"weights and gradients, fp32 AdamW; activations {activations / 2**30:.1f} GiB "
          f"per micro-batch of {scenes} scenes: peak minus resident memory of the LoRA step)")
    cols = ["weights", "gradients", "optimizer", "step_fp32_grads", "buckets", "activations",
            "total"]
    print("| ZeRO | GPUs | " + " | ".join(cols) + " | fits 139 GiB |")
    print("|---" * (len(cols) + 3) + "|")
    for r in rows:
        fits = "yes" if r["fits_h200"] else "no"
        print(f"| {r['zero_stage']} | {r['gpus']} | "
              + " | ".join(f"{r[c]:.1f}" for c in cols) + f" | {fits} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:  # before anything asks CUDA: the engine then places everything on the CPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        print("bench_real_size needs CUDA (or --smoke)")
        return 1
    from srdrl.data.dataset import JsonlDataset, collate
    from srdrl.data.synthetic import SyntheticDataConfig, make_dataset
    from srdrl.engine import init_distributed
    from srdrl.policy.model import VLM_INPUTS_KEY
    from srdrl.timing import SectionTimer

    _, _, device = init_distributed()
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(SyntheticDataConfig(output_dir=tmp, num_scenes=args.scenes + 2,
                                         width=args.width, height=args.height,
                                         frames=args.frames, seed=0), progress=False)
        dataset = JsonlDataset(Path(tmp) / "train.jsonl")
        batch = collate([dataset[i] for i in range(args.scenes)])
        texts = [r["reasoning"] for r in dataset.records]
    engine, module, counts, build_s = build(args, texts, device)
    batch = {**batch, VLM_INPUTS_KEY: module.policy.input_builder(batch)}
    prefix_tokens = int(batch[VLM_INPUTS_KEY].input_ids.shape[1])
    image_tokens = int(batch[VLM_INPUTS_KEY].mm_token_type_ids.sum()) // args.scenes
    timer = SectionTimer(cuda=cuda)
    one_step = training_step(engine, batch, args.scenes, timer)

    for _ in range(args.warmup):
        one_step()
    timer.collect()  # drop the warm-up's sections
    if cuda:
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    timing, per_step = time_steps(one_step, timer, args.steps)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    if not cuda:
        resident = None
    phases = {k: sum(s.get(k, 0.0) for s in per_step) / args.steps
              for k in sorted(set().union(*per_step))}  # mean ms per step
    times, step_s = list(timing.times_s), timing.median_s
    flops = count_step_flops(module, one_step, args.gradient_checkpointing).total
    peak_rate = bf16_matmul_peak() if cuda else None
    sizes = part_sizes(module)
    # what one step adds on top of weights and optimizer state: activations, gradients of
    # the trained parameters, temporaries; stands in for full fine-tuning's activations
    activations = (peak - resident) if cuda else 0.0
    table = memory_table(sizes, activations)

    result = {
        "step_ms_median": 1e3 * step_s, "step_ms_all": [1e3 * t for t in times],
        "timing": "cuda events" if cuda else "wall clock", "phases_ms": phases,
        "scenes_per_s": args.scenes / step_s, "build_s": build_s,
        "model_flops_per_step": flops, "model_tflops_per_s": flops / step_s / 1e12,
        "bf16_peak_tflops_per_s": peak_rate / 1e12 if peak_rate else None,
        "mfu": flops / step_s / peak_rate if peak_rate else None,
        "peak_memory_gib": peak / 2**30 if cuda else None,
        "resident_memory_gib": resident / 2**30 if cuda else None,
        "step_transient_memory_gib": activations / 2**30,
        "prefix_tokens": prefix_tokens, "image_tokens_per_scene": image_tokens,
        "lora_params": counts, "parameters": sizes,
    }
    info = {**device_info(), **{k: v for k, v in vars(args).items()},
            "release_parameters": RELEASE_PARAMS if not args.smoke else None}
    path = write_json("bench_real_size.json",
                      {"info": info, "result": result, "full_finetune_memory": table})
    print(info)
    print(f"parameters: {sizes}  (release: {RELEASE_PARAMS})")
    print(f"LoRA: {counts}")
    print(f"prefix {prefix_tokens} tokens ({image_tokens} image tokens per scene); "
          f"build {build_s:.1f} s")
    print(f"step {1e3 * step_s:.1f} ms median ({result['timing']}), "
          f"{result['scenes_per_s']:.2f} scenes/s, model {flops / 1e12:.3f} TFLOP/step = "
          f"{result['model_tflops_per_s']:.1f} TFLOP/s"
          + (f", MFU {100 * result['mfu']:.1f}% of {peak_rate / 1e12:.0f} TFLOP/s measured, "
             f"peak {result['peak_memory_gib']:.1f} GiB" if cuda else ""))
    print("phases (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print_memory_table(table, sizes["total"], activations, args.scenes)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
