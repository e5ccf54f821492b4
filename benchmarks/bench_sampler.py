"""Benchmark: the flow-matching denoising loop (prefix already encoded), three ways.

  sequential   the original prototype's style: one candidate at a time, each its own Euler
               loop at batch 1, in a Python loop over scenes and candidates
  eager        all B * N candidates in one batch, eager PyTorch
  graph        the same batch, the whole loop replayed from a CUDA graph

Same policy, prefix and noise for all three; outputs are compared first. Times are CUDA
events after warm-up, medians (and 20/80 % quantiles) over repeats; each call includes what
it must do per call (the graph variant copies the prefix and noise into its static buffers).
The floor for the graph is the sum of its kernels' device times from ``torch.profiler``.
Targets: graph >= 3x eager and >= 10x sequential, and within 1.25x of its kernel floor.

    python benchmarks/bench_sampler.py                 # bench config, bf16 weights, B=8 N=4
    python benchmarks/bench_sampler.py --precision autocast --scenes 4 --samples 8

Prints the GPU, versions and a short table last; writes everything to
$OUT/bench_sampler.json (OUT defaults to ./bench_out). Timing, versions and the JSON file
come from benchmarks/common.py.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import device_info, time_cuda, write_json  # noqa: E402

TARGETS = {"graph_vs_eager": 3.0, "graph_vs_sequential": 10.0, "graph_vs_floor": 1.25}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="bench", help="PolicyConfig preset (default: bench)")
    p.add_argument("--scenes", type=int, default=8, help="B, scenes per batch")
    p.add_argument("--samples", type=int, default=4, help="N, candidates per scene")
    p.add_argument("--steps", type=int, default=10, help="Euler steps")
    p.add_argument("--precision", choices=["bf16", "autocast", "fp32"], default="bf16",
                   help="bf16 weights, fp32 weights under bf16 autocast, or fp32")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per batched variant")
    p.add_argument("--sequential-repeats", type=int, default=5,
                   help="timed calls of the (slow) sequential variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-kernels", type=int, default=0,
                   help="also print the graph variant's K most expensive kernels")
    return p.parse_args(argv)


def fake_batch(num_scenes: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    texts = [
        "Mud patch ahead on the left at 14 m; steer right to pass it.",
        "Clear dirt track ahead; keep straight.",
        "The track is blocked by loose rocks 9 m ahead. Brake and come to a stop.",
        "I see a puddle 21 m ahead, right of centre; nudge to the left.",
    ]
    speed = 2.0 + 6.0 * torch.rand(num_scenes, generator=g)
    history = torch.zeros(num_scenes, 16, 3)
    history[..., 0] = speed[:, None] * torch.arange(-15, 1) * 0.1
    return {
        "images": torch.randint(0, 256, (num_scenes, 1, 192, 320, 3), dtype=torch.uint8,
                                generator=g),
        "ego_history_xyz": history,
        "reasoning_text": [texts[i % len(texts)] for i in range(num_scenes)],
        "sample_id": [str(i) for i in range(num_scenes)],
    }


def time_ms(fn, repeats: int, warmup: int) -> dict:
    """CUDA-event timing of ``fn`` as this report lists it: median, 20/80 % quantiles and
    every sample, in milliseconds."""
    return time_cuda(fn, iters=repeats, warmup=warmup).summary(
        "ms", include_min=False, include_times=True)


def kernel_floor_ms(fn, calls: int = 5, top: int = 0) -> tuple[float, int]:
    """Sum of device times of the kernels (and device copies/fills) one call launches;
    prints the ``top`` most expensive kernels by total device time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    total_us = sum(e.time_range.elapsed_us() for e in device)
    if top:
        by_name: dict[str, list[float]] = {}
        for e in device:
            by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
        ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
        print(f"{'us/call':>9} {'count/call':>10}  kernel")
        for name, times in ranked:
            print(f"{sum(times) / calls:>9.1f} {len(times) / calls:>10.1f}  {name[:110]}")
    return total_us / calls / 1000.0, len(device) // calls


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sampler needs a CUDA GPU (use --help for the options)", file=sys.stderr)
        return 2
    from srdrl.policy import (
        Denoiser,
        PolicyConfig,
        Prefix,
        VLAPolicy,
        build_tokenizer,
        initial_noise,
    )
    from srdrl.policy.sampler import euler_loop

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    config = PolicyConfig.preset(args.preset)
    batch = fake_batch(args.scenes, args.seed)
    policy = VLAPolicy(config, build_tokenizer(config, batch["reasoning_text"]))
    weights_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    policy = policy.to(device=device, dtype=weights_dtype).eval()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
                if args.precision == "autocast" else nullcontext())

    with torch.no_grad(), autocast:
        prefix = policy.encode_prefix(batch)
    B, N, T, steps = args.scenes, args.samples, config.num_waypoints, args.steps
    prefix_len = prefix.keys[0].shape[2]
    x0 = initial_noise(B, N, T, 0.2, torch.Generator().manual_seed(args.seed), device)
    denoiser = Denoiser()
    scene_contexts = [  # one scene, one candidate: what the prototype's loop saw
        policy.expert_context(
            Prefix(**{**vars(prefix), "keys": [k[b:b + 1] for k in prefix.keys],
                      "values": [v[b:b + 1] for v in prefix.values],
                      "key_mask": prefix.key_mask[b:b + 1]}),
            candidates=1, workspace=True,
        )
        for b in range(B)
    ]

    @torch.no_grad()
    def sequential():
        out = torch.empty(B, N, T, 2, device=device)
        with autocast:
            for b in range(B):
                for i in range(N):
                    out[b, i] = euler_loop(policy, x0[b, i:i + 1], scene_contexts[b], steps)[0]
        return out

    def eager():
        with autocast:
            return denoiser.denoise(policy, prefix, x0, steps, use_cuda_graph=False)

    def graph():
        with autocast:
            return denoiser.denoise(policy, prefix, x0, steps, use_cuda_graph=True)

    # ---- correctness first
    out_eager, out_graph, out_seq = eager(), graph(), sequential()
    tol = 1e-4 if args.precision == "fp32" else 5e-2  # sequential: other shapes, other sums
    checks = {
        "graph_vs_eager_max_abs": (out_graph - out_eager).abs().max().item(),
        "sequential_vs_eager_max_abs": (out_seq - out_eager).abs().max().item(),
        "tolerance": tol,
        "graph_replay_deterministic": bool(torch.equal(graph(), graph())),
    }
    ok = (checks["graph_vs_eager_max_abs"] <= 1e-5  # same kernels on the same shapes
          and torch.allclose(out_seq, out_eager, atol=tol, rtol=tol)
          and checks["graph_replay_deterministic"])
    checks["ok"] = ok
    if not ok:
        print(f"CHECK FAILED: {checks}", file=sys.stderr)

    # ---- timing
    results = {
        "sequential": time_ms(sequential, args.sequential_repeats, 1),
        "eager": time_ms(eager, args.repeats, args.warmup),
        "graph": time_ms(graph, args.repeats, args.warmup),
    }
    floor_ms, kernels = kernel_floor_ms(graph, top=args.top_kernels)
    eager_floor_ms, eager_kernels = kernel_floor_ms(eager)
    g = results["graph"]["median_ms"]
    ratios = {
        "graph_vs_eager": results["eager"]["median_ms"] / g,
        "graph_vs_sequential": results["sequential"]["median_ms"] / g,
        "graph_vs_floor": g / floor_ms,
        "eager_vs_its_floor": results["eager"]["median_ms"] / eager_floor_ms,
    }
    info = device_info()
    report = {
        "gpu": info["gpu"],
        "versions": {key: info.get(key) for key in ("torch", "cuda", "transformers", "python")},
        "args": vars(args),
        "config": config.to_dict(),
        "prefix_tokens": prefix_len,
        "rows": B * N,
        "expert_parameters": sum(p.numel() for p in policy.expert.parameters()),
        "checks": checks,
        "results": results,
        "graph_kernel_floor_ms": floor_ms,
        "graph_kernels_per_call": kernels,
        "eager_kernel_floor_ms": eager_floor_ms,
        "eager_kernels_per_call": eager_kernels,
        "ratios": ratios,
        "targets": TARGETS,
        "graph_captures": denoiser.captures,
    }
    json_path = write_json("bench_sampler.json", report)

    v = report["versions"]
    print(f"GPU: {report['gpu']} | torch {v['torch']} (CUDA {v['cuda']}) | "
          f"transformers {v['transformers']} | Python {v['python']}")
    print(f"preset={args.preset} precision={args.precision} B={B} N={N} steps={steps} "
          f"prefix={prefix_len} tokens, expert {report['expert_parameters'] / 1e6:.0f}M params")
    print(f"checks: graph-eager max|d|={checks['graph_vs_eager_max_abs']:.2e}, "
          f"sequential-eager max|d|={checks['sequential_vs_eager_max_abs']:.2e} "
          f"(atol=rtol={tol:g}) -> {'ok' if ok else 'FAILED'}")
    print(f"graph kernel floor {floor_ms:.3f} ms ({kernels} kernels/call); "
          f"eager kernels {eager_floor_ms:.3f} ms ({eager_kernels}/call)")
    print(f"\n{'variant':<12}{'median ms':>12}{'p20':>10}{'p80':>10}{'graph is x faster':>20}")
    for name in ("sequential", "eager", "graph"):
        r = results[name]
        speedup = r["median_ms"] / g
        print(f"{name:<12}{r['median_ms']:>12.3f}{r['p20_ms']:>10.3f}{r['p80_ms']:>10.3f}"
              f"{speedup:>20.2f}")
    print(f"{'floor':<12}{floor_ms:>12.3f}{'':>10}{'':>10}{floor_ms / g:>20.2f}")
    verdict = [
        f"graph/eager {ratios['graph_vs_eager']:.2f}x (target >= {TARGETS['graph_vs_eager']})",
        f"graph/sequential {ratios['graph_vs_sequential']:.1f}x "
        f"(target >= {TARGETS['graph_vs_sequential']})",
        f"graph/floor {ratios['graph_vs_floor']:.3f} (target <= {TARGETS['graph_vs_floor']})",
    ]
    print("; ".join(verdict))
    print(f"wrote {json_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
