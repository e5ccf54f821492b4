"""Benchmark: path-safety scoring, every backend on the same inputs, in one run.

Variants: the original Python/OpenCV loop (reference, on the CPU, timed on a subset of
scenes and scaled to the batch), Kornia (batched torch ops on the GPU), the fused Triton
kernels called eagerly, and the same replayed from a CUDA graph (reference colour computed
in the call, and given; every crop on the masked row walk, without the interior fast path;
other row-loop unroll factors). Each variant is checked against the reference on the timed inputs
before it is timed. Timing: CUDA events around single calls after warm-up, L2 flushed
before each call (a scoring call follows a training step, so its inputs are cold), median
and 20/80 % quantiles.

The floor: a patch-reading kernel must at least move the patch bytes, B*N*T*P*P*3, once at
the device-to-device copy bandwidth measured in this run (bytes read + written / time) and
pay one launch (an empty Triton kernel, measured eagerly and from a graph).
Timing, copy bandwidth, versions and the JSON file come from benchmarks/common.py.

Run on the GPU machine:  python benchmarks/bench_path_safety.py [--iters 100]
Full numbers go to $OUT/bench_path_safety.json (default ./bench_out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import copy_bandwidth, device_info, time_cuda, write_json  # noqa: E402

CASES = {"small": (8, 4, 64), "large": (64, 16, 64)}  # (B, N, T)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--small", type=int, nargs=3, metavar=("B", "N", "T"), help="override")
    p.add_argument("--large", type=int, nargs=3, metavar=("B", "N", "T"), help="override")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--patch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=100, help="timed calls per variant")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reference-scenes", type=int, default=1,
                   help="scenes the OpenCV loop is timed and checked on (then scaled)")
    p.add_argument("--no-flush", action="store_true", help="keep L2 warm between calls")
    p.add_argument("--row-unroll-sweep", type=int, nargs="*", default=[2, 8],
                   help="also time the graph call with these row-loop unroll factors")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_inputs(B, N, T, H, W, seed, device):
    """Textured frames and driving paths 2.5-40 m ahead that mostly land in the image."""
    import torch

    from srdrl.camera import default_camera

    g = torch.Generator(device=device).manual_seed(seed)
    y = torch.arange(H, device=device, dtype=torch.float32)[:, None, None]
    x = torch.arange(W, device=device, dtype=torch.float32)[None, :, None]
    phase = torch.rand(B, 1, 1, 3, generator=g, device=device) * 6.28
    waves = 120 + 50 * torch.sin(x / 9 + phase) * torch.cos(y / 7 + 2 * phase)  # (B,H,W,3)
    grain = torch.rand(B, H, W, 3, generator=g, device=device) * 120 - 60
    band = (x > W * 0.3) & (x < W * 0.55)  # rough band: gravel across part of the road
    images = (waves + torch.where(band, grain, grain * 0.1)).clamp(1, 254).to(torch.uint8)

    K, T_ce = default_camera(W, H)
    K = K.to(device).expand(B, 3, 3).contiguous()
    T_ce = T_ce.to(device).expand(B, 4, 4).contiguous()
    ahead = torch.linspace(2.5, 40.0, T, device=device)  # (T,) metres
    slope = (torch.rand(B, N, 1, generator=g, device=device) - 0.5) * 0.6
    bend = (torch.rand(B, N, 1, generator=g, device=device) - 0.5) * 0.02
    lateral = slope * ahead + bend * ahead**2  # (B, N, T)
    paths = torch.stack([ahead.expand(B, N, T), lateral, torch.zeros_like(lateral)], -1)
    return dict(images=images, trajectories=paths.float().contiguous(), K=K, T_cam_from_ego=T_ce)


def empty_launch(timer):
    """Seconds for one empty Triton kernel: launched eagerly, and replayed from a graph.

    ``timer``: :func:`common.time_cuda` with this run's settings."""
    import torch
    import triton

    @triton.jit
    def _empty(x_ptr):
        pass

    x = torch.empty(1, device="cuda")
    eager = timer(lambda: _empty[(1,)](x)).median_s
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _empty[(1,)](x)
    return eager, timer(graph.replay).median_s


def check(result, expected, k):
    """Max errors of a variant's first k scenes against the float64 reference."""
    import torch

    got = [x[:k].cpu() for x in result]
    vis_ok = torch.equal(got[3], expected.visible.cpu())
    var_err = ((got[1].double() - expected.variance).abs() / (expected.variance.abs() + 10.0)).max()
    col_err = (got[2].double() - expected.colour_distance).abs().max()
    saf_err = (got[0].double() - expected.safety).abs().max()
    ok = vis_ok and var_err < 1e-4 and col_err < 1e-5 and saf_err < 1e-4
    return {"ok": bool(ok), "visible_equal": vis_ok, "variance_rel_err": float(var_err),
            "colour_abs_err": float(col_err), "safety_abs_err": float(saf_err)}


def peak_extra_memory(fn):
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_case(name, shape, args, timer, bandwidth, launch_graph_s):
    import torch

    from srdrl.kernels import path_safety_triton as kernel_module
    from srdrl.kernels.path_safety_common import reference_colour
    from srdrl.kernels.path_safety_kornia import path_safety_kornia
    from srdrl.kernels.path_safety_triton import ROW_UNROLL, allocate_outputs, path_safety_triton
    from srdrl.kernels.reference import path_safety_reference

    B, N, T = shape
    H, W, P = args.height, args.width, args.patch_size
    inputs = make_inputs(B, N, T, H, W, args.seed, "cuda")
    k = min(args.reference_scenes, B)
    cpu_subset = {key: v[:k].cpu() for key, v in inputs.items()}
    expected = path_safety_reference(**cpu_subset, patch_size=P)
    visible_fraction = float(expected.visible.double().mean())

    t0 = time.perf_counter()
    for _ in range(3):
        path_safety_reference(**cpu_subset, patch_size=P)
    reference_s = (time.perf_counter() - t0) / 3 * B / k

    ref_rgb = reference_colour(inputs["images"]).float()
    out = allocate_outputs(B, N, T, "cuda")
    out_given = allocate_outputs(B, N, T, "cuda")

    def kornia():
        return path_safety_kornia(**inputs, patch_size=P)

    def triton():
        return path_safety_triton(**inputs, patch_size=P, out=out)

    def triton_given():
        return path_safety_triton(**inputs, patch_size=P, ref_rgb=ref_rgb, out=out_given)

    def triton_masked():
        return path_safety_triton(**inputs, patch_size=P, out=out, interior_fast_path=False)

    patches = B * N * T
    patch_bytes = patches * P * P * 3
    floor_s = patch_bytes / bandwidth + launch_graph_s
    rows = {"reference (OpenCV loop, CPU)": {
        "median_s": reference_s, "scaled_from_scenes": k, "patches_per_s": patches / reference_s}}

    def measure(label, fn, result, memory):
        row = {"check": check(result, expected, k), "peak_extra_bytes": memory}
        row.update(timer(fn).summary("s"))
        row["patches_per_s"] = patches / row["median_s"]
        row["vs_reference"] = reference_s / row["median_s"]
        row["patch_bandwidth_fraction"] = patch_bytes / row["median_s"] / bandwidth
        row["fraction_of_floor"] = floor_s / row["median_s"]
        rows[label] = row

    for label, fn in (("kornia", kornia), ("triton", triton)):
        result = fn()
        measure(label, fn, result, peak_extra_memory(fn))
    graph_variants = [("triton graph", triton, out, ROW_UNROLL),
                      ("triton graph ref given", triton_given, out_given, ROW_UNROLL),
                      ("triton graph masked walk", triton_masked, out, ROW_UNROLL)]
    graph_variants += [(f"triton graph unroll {u}", triton, out, u)
                       for u in args.row_unroll_sweep if u != ROW_UNROLL]
    for label, fn, buffers, unroll in graph_variants:
        kernel_module.ROW_UNROLL = unroll  # read at launch, so at compile and capture
        try:
            fn()  # compile outside the capture
            graph = torch.cuda.CUDAGraph()

            def capture(graph=graph, fn=fn):
                with torch.cuda.graph(graph):
                    fn()

            memory = peak_extra_memory(capture)  # the graph's private pool
        finally:
            kernel_module.ROW_UNROLL = ROW_UNROLL
        for x in buffers[:3]:
            x.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        measure(label, graph.replay, buffers, memory)
    for row in rows.values():
        if "kornia" in rows and row is not rows["reference (OpenCV loop, CPU)"]:
            row["vs_kornia"] = rows["kornia"]["median_s"] / row["median_s"]
    return {"B": B, "N": N, "T": T, "H": H, "W": W, "P": P, "patches": patches,
            "patch_bytes": patch_bytes, "floor_s": floor_s, "visible_fraction": visible_fraction,
            "variants": rows}


def main():
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    if args.small:
        CASES["small"] = tuple(args.small)
    if args.large:
        CASES["large"] = tuple(args.large)
    flush = not args.no_flush
    timer = partial(time_cuda, iters=args.iters, warmup=args.warmup, flush_l2=flush)
    info = device_info()
    env = {key: info.get(key) for key in ("gpu", "torch", "triton", "kornia")}
    env.update(l2_flushed=flush, iters=args.iters)
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    bandwidth = copy_bandwidth(iters=args.iters, warmup=args.warmup, flush_l2=flush)
    launch_eager_s, launch_graph_s = empty_launch(timer)
    env.update(copy_bandwidth_Bps=bandwidth, empty_launch_eager_s=launch_eager_s,
               empty_launch_graph_s=launch_graph_s)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + written); empty Triton launch "
          f"{launch_eager_s * 1e6:.1f} us eager, {launch_graph_s * 1e6:.1f} us from a graph",
          flush=True)

    results = {}
    for name in args.cases:
        results[name] = run_case(name, CASES[name], args, timer, bandwidth, launch_graph_s)
        print(json.dumps(results[name], indent=1), flush=True)

    write_json("bench_path_safety.json", {"env": env, "cases": results})

    print(f"\n{env['gpu']}; torch {env['torch']}, triton {env['triton']}, kornia {env['kornia']}")
    head = (f"{'case':6} {'variant':28} {'median us':>10} {'p20-p80 us':>15} {'Mpatch/s':>9} "
            f"{'x ref':>8} {'x kornia':>8} {'floor %':>8} {'bw %':>6} {'extra MB':>8} check")
    print(head)
    for name, case in results.items():
        for label, r in case["variants"].items():
            spread = (f"{r['p20_s'] * 1e6:.1f}-{r['p80_s'] * 1e6:.1f}" if "p20_s" in r
                      else f"({r['scaled_from_scenes']} scene, scaled)")
            print(f"{name:6} {label:28} {r['median_s'] * 1e6:10.1f} {spread:>15} "
                  f"{r['patches_per_s'] / 1e6:9.2f} {r.get('vs_reference', 1.0):8.1f} "
                  f"{r.get('vs_kornia', float('nan')):8.2f} "
                  f"{100 * r.get('fraction_of_floor', float('nan')):8.1f} "
                  f"{100 * r.get('patch_bandwidth_fraction', float('nan')):6.1f} "
                  f"{r.get('peak_extra_bytes', 0) / 2**20:8.1f} "
                  f"{'ok' if r.get('check', {'ok': True})['ok'] else 'MISMATCH'}")
        print(f"{name:6} floor {case['floor_s'] * 1e6:.1f} us = {case['patch_bytes'] / 1e6:.1f} MB "
              f"patch bytes at copy bandwidth + one graph launch; "
              f"{case['visible_fraction']:.0%} of waypoints visible")


if __name__ == "__main__":
    main()
