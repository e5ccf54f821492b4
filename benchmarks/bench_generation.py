"""Benchmark: reasoning generation, the VLM writing its reasoning before the expert runs.

Variants, all greedy, on the same prompts (bench preset, B = 8 scenes of random 320x192
frames, about 530 prompt tokens each; every row writes exactly --new-tokens tokens, the
stop tokens being suppressed until then, so that every variant does the same work):

  one_by_one   a Python loop over the scenes, batch 1, dynamic KV cache, eager
  batched      all B scenes in one ``generate`` call, dynamic cache, eager: what srdrl runs
  static       the same with transformers' static cache, still eager (``disable_compile``)
  compiled     static cache + transformers' own torch.compile of the decode step
               (``CompileConfig(mode="reduce-overhead")``: inductor kernels replayed from
               CUDA graphs); the first calls compile (about a minute); --no-compile skips it

Also timed: the prefill alone (a 1-token generate, of the batch and of one scene), and
re-encoding prompt + reasoning for the expert's prefix (``encode_prefix``; srdrl pays it
once per generation, see srdrl/policy/generation.py). Decode step = (generate - prefill) /
(new tokens - 1): a step of the whole batch, or of one scene for one_by_one; the compiled
variant's prefill is taken as the eager one's (transformers compiles the decode only).

Floor of a decode step: the bytes it must read at least, the text decoder's and lm_head's
weights (the embedding table is only indexed) plus the KV cache at the final length, at
the device's copy bandwidth measured in this run (benchmarks/common.py). An eager decode
step of a model this size is launch-bound, far above that floor; the compiled step shows
what a graph recovers.

    python benchmarks/bench_generation.py                  # bench preset, bf16, B=8, 64 tokens
    python benchmarks/bench_generation.py --no-compile --new-tokens 32
    python benchmarks/bench_generation.py --device cpu --preset tiny --repeats 2 --no-compile
                                                           # smoke run of the logic, host timers

Prints the GPU, versions and a table; writes $OUT/bench_generation.json (OUT defaults to
./bench_out). Token agreement between variants is reported, not required: bf16 rounding
differs with batch shape and cache layout, and one flipped argmax changes the rest of a row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import Timing, copy_bandwidth, device_info, time_cuda, write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="bench", help="PolicyConfig preset (default: bench)")
    p.add_argument("--scenes", type=int, default=8, help="B, scenes per batch")
    p.add_argument("--new-tokens", type=int, default=64, help="reasoning tokens per scene")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="weights")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per batched variant")
    p.add_argument("--one-by-one-repeats", type=int, default=2,
                   help="timed calls of the (slow) scene-at-a-time loop")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls before timing (after the first, token-checking call)")
    p.add_argument("--compile-warmup", type=int, default=3,
                   help="untimed calls of the compiled variant (compile, graph recording)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a smoke run of this script with host timers and no floor")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def fake_batch(num_scenes: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    speed = 2.0 + 6.0 * torch.rand(num_scenes, generator=g)
    history = torch.zeros(num_scenes, 16, 3)
    history[..., 0] = speed[:, None] * torch.arange(-15, 1) * 0.1
    return {"images": torch.randint(0, 256, (num_scenes, 1, 192, 320, 3), dtype=torch.uint8,
                                    generator=g),
            "ego_history_xyz": history,
            "reasoning_text": ["Mud ahead on the left at 14 m; steer right to pass it."]
            * num_scenes}


def timer(device: str):
    """CUDA events on GPU (common.time_cuda); the host clock for the CPU smoke run."""
    if device == "cuda":
        return time_cuda

    def host(fn, *, iters, warmup):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return Timing(tuple(times))
    return host


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the share of tokens before the first disagreement."""
    differ = (a.cpu() != b.cpu()).int()
    first = torch.where(differ.any(1), differ.argmax(1), torch.full_like(differ[:, 0],
                                                                         a.shape[1]))
    return float(first.float().mean() / a.shape[1])


def decode_floor_bytes(policy, scenes: int, final_length: int) -> dict:
    """Bytes a decode step reads at least: weights (text decoder without its embedding
    table, lm_head) and the KV cache of ``final_length`` tokens per scene."""
    text = policy.vlm.model.language_model
    weights = sum(p.numel() * p.element_size() for n, p in text.named_parameters()
                  if not n.startswith("embed_tokens"))
    weights += policy.vlm.lm_head.weight.numel() * policy.vlm.lm_head.weight.element_size()
    c = policy.config
    element = next(text.parameters()).element_size()
    kv = c.num_layers * 2 * c.num_key_value_heads * c.head_dim * scenes * final_length * element
    return {"weight_bytes": weights, "kv_bytes_at_end": kv}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_generation needs a CUDA GPU (or --device cpu for a smoke run; --help)",
              file=sys.stderr)
        return 2
    from transformers import CompileConfig

    from srdrl.policy import PolicyConfig, VLAPolicy, build_tokenizer
    from srdrl.policy.generation import generate_tokens, stop_token_ids

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    time_fn = timer(args.device)
    config = PolicyConfig.preset(args.preset)
    batch = fake_batch(args.scenes, args.seed)
    policy = VLAPolicy(config, build_tokenizer(config, batch["reasoning_text"]))
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    policy = policy.to(device=device, dtype=dtype).eval()
    B, N = args.scenes, args.new_tokens

    start = time.perf_counter()
    prompt = policy.input_builder.prompt(batch)
    host_prompt_ms = 1e3 * (time.perf_counter() - start)  # image processing, tokenising
    prompt = prompt.to(device)
    scene_prompts = [policy.input_builder.prompt({k: v[b:b + 1] for k, v in batch.items()})
                     .to(device) for b in range(B)]
    prompt_tokens = prompt.attention_mask.sum(1).float().mean().item()

    def generate(inputs, new_tokens=N, **options):
        return generate_tokens(policy, inputs, new_tokens, min_new_tokens=new_tokens,
                               **options)

    variants = {
        "one_by_one": lambda: torch.cat([generate(p) for p in scene_prompts]),
        "batched": lambda: generate(prompt),
        "static": lambda: generate(prompt, cache_implementation="static",
                                   disable_compile=True),
    }
    compile_config = CompileConfig(mode="reduce-overhead")
    if args.device == "cpu":
        compile_config._compile_all_devices = True  # transformers compiles on GPUs only
    if not args.no_compile:
        variants["compiled"] = lambda: generate(prompt, cache_implementation="static",
                                                compile_config=compile_config)

    # ---- tokens first: what each variant writes, against the batched eager run
    tokens, errors, first_call_s = {}, {}, {}
    for name, fn in variants.items():
        start = time.perf_counter()
        try:
            tokens[name] = fn()
        except Exception as e:  # report a variant that cannot run, keep the others
            errors[name] = f"{type(e).__name__}: {e}"[:500]
            print(f"{name}: FAILED {errors[name]}", file=sys.stderr)
        first_call_s[name] = time.perf_counter() - start
    for name in errors:
        variants.pop(name)
    agreement = {name: common_prefix(t, tokens["batched"]) for name, t in tokens.items()
                 if name != "batched" and "batched" in tokens}
    assert all(t.shape == (B, N) for t in tokens.values()), {k: v.shape for k, v in
                                                              tokens.items()}

    # ---- timing
    results = {}
    for name, fn in variants.items():
        iters = args.one_by_one_repeats if name == "one_by_one" else args.repeats
        warmup = args.compile_warmup if name == "compiled" else args.warmup
        warmup = 0 if name == "one_by_one" else warmup  # its first call warmed it
        results[name] = time_fn(fn, iters=iters, warmup=warmup).summary("ms")
    results["prefill"] = time_fn(lambda: generate(prompt, 1), iters=args.repeats,
                                 warmup=args.warmup).summary("ms")
    results["prefill_one_scene"] = time_fn(lambda: generate(scene_prompts[0], 1),
                                           iters=args.repeats, warmup=args.warmup).summary("ms")
    ids = tokens.get("batched", next(iter(tokens.values()))).tolist()
    stops = set(stop_token_ids(policy))
    ids = [[t for t in row if t not in stops] for row in ids]
    inputs = policy.input_builder.with_reasoning(batch, ids).to(device)
    with torch.no_grad():
        results["reencode_prefix"] = time_fn(lambda: policy.encode_prefix(batch, inputs),
                                             iters=args.repeats,
                                             warmup=args.warmup).summary("ms")

    rows = {}  # decode step: a batch-of-B step, or for one_by_one a batch-of-1 step
    for name in variants:
        total = results[name]["median_ms"]
        if name == "one_by_one":
            step = (total - B * results["prefill_one_scene"]["median_ms"]) / (B * (N - 1))
        else:
            step = (total - results["prefill"]["median_ms"]) / (N - 1)
        rows[name] = {"median_ms": total, "tokens_per_s": B * N / total * 1e3,
                      "decode_step_ms": step}

    floor = decode_floor_bytes(policy, B, int(prompt_tokens) + N)
    bandwidth = copy_bandwidth() if args.device == "cuda" else None
    floors = None
    if bandwidth is not None:
        floors = {"weights_only_ms": floor["weight_bytes"] / bandwidth * 1e3,
                  "weights_and_kv_ms": (floor["weight_bytes"] + floor["kv_bytes_at_end"])
                  / bandwidth * 1e3}
        for row in rows.values():
            row["step_vs_floor"] = row["decode_step_ms"] / floors["weights_and_kv_ms"]

    info = device_info()
    report = {
        "gpu": info["gpu"],
        "versions": {k: info.get(k) for k in ("torch", "cuda", "transformers", "python")},
        "args": vars(args), "config": config.to_dict(),
        "prompt_tokens_mean": prompt_tokens, "host_prompt_build_ms": host_prompt_ms,
        "vlm_text_parameters": sum(p.numel() for p in policy.vlm.model.language_model
                                   .parameters()),
        "errors": errors, "first_call_s": first_call_s, "token_agreement": agreement,
        "results": results, "rows": rows, "floor": {**floor, "copy_bandwidth_Bps": bandwidth,
                                                     "step_floor_ms": floors},
    }
    json_path = write_json("bench_generation.json", report)

    v = report["versions"]
    print(f"GPU: {report['gpu']} | torch {v['torch']} (CUDA {v['cuda']}) | "
          f"transformers {v['transformers']} | Python {v['python']}")
    print(f"preset={args.preset} {args.precision} B={B} new tokens={N} prompt={prompt_tokens:.0f} "
          f"tokens; VLM text {report['vlm_text_parameters'] / 1e6:.0f}M params; host prompt "
          f"build {host_prompt_ms:.0f} ms")
    if floors is not None:
        print(f"decode-step floor {floors['weights_and_kv_ms']:.3f} ms (weights "
              f"{floor['weight_bytes'] / 1e6:.0f} MB + KV {floor['kv_bytes_at_end'] / 1e6:.0f} "
              f"MB at {bandwidth / 1e12:.2f} TB/s copy bandwidth)")
    print(f"\n{'variant':<18}{'median ms':>12}{'tokens/s':>11}{'step ms':>10}{'x floor':>9}"
          f"{'x batched':>11}{'agree':>8}{'first call s':>14}")
    base = rows.get("batched", {}).get("median_ms")
    for name, row in rows.items():
        ratio = f"{row['median_ms'] / base:.2f}" if base else "n/a"
        vs_floor = f"{row['step_vs_floor']:.1f}" if "step_vs_floor" in row else "n/a"
        agree = f"{agreement[name]:.2f}" if name in agreement else "-"
        print(f"{name:<18}{row['median_ms']:>12.2f}{row['tokens_per_s']:>11.0f}"
              f"{row['decode_step_ms']:>10.3f}{vs_floor:>9}{ratio:>11}{agree:>8}"
              f"{first_call_s[name]:>14.1f}")
    for name in ("prefill", "prefill_one_scene", "reencode_prefix"):
        print(f"{name:<18}{results[name]['median_ms']:>12.2f}")
    for name, error in errors.items():
        print(f"{name}: not timed, {error}")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
