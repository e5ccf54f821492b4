"""Does the policy have to look? Hazard kind and side read from the image, teacher-forced.

Trains a policy with the language loss alone (``srdrl.train`` with the trajectory, RL and
consistency weights at 0, on the generated synthetic data), or takes a trained one
(``--policy DIR``), and reads its next-token prediction, given the true text before it, at
two words of the reasoning of held-out scenes: the first hazard kind (mud, rocks, water)
and the first side (left, right). Every scene is read twice: with its real frame, and with
the same frame rendered without its hazards (a hazard-free road; everything else, track,
light, camera, speed, equal). The image is needed when the hazard-free accuracy sits at
chance and sufficient when the real one is high. Reported per word: accuracy of the
argmax over the class words (chance: the largest class share, the best guess without the
image) and of the argmax over the whole vocabulary. No generation: the text before the
word is the dataset's.

    python benchmarks/seeing_check.py                          # the main job's budget
    python benchmarks/seeing_check.py --policy outputs/srdrl/policy   # a trained policy
    python benchmarks/seeing_check.py -- --num_train_epochs 6  # flags after -- go to the trainer

Held-out scenes are the generator's scenes ``num_scenes .. num_scenes + held_out - 1`` (the
trainer's data uses the first ``num_scenes``; same seed). Writes
``$OUT/seeing_check.json`` (OUT defaults to ./bench_out) and prints a table. CPU, a few
minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from srdrl.data.render import render_frames  # noqa: E402
from srdrl.data.scenes import HAZARD_KINDS, sample_scene  # noqa: E402
from srdrl.data.synthetic import SyntheticDataConfig, synthetic_camera  # noqa: E402
from srdrl.policy.inputs import IGNORE_INDEX  # noqa: E402
from srdrl.policy.model import _ROPE_INDEX_TAKES_TYPES, VLAPolicy  # noqa: E402

WORDS = {"kind": HAZARD_KINDS, "side": ("left", "right")}


def train_language_only(out: Path, num_scenes: int, seed: int, extra: list[str]) -> Path:
    """Run the trainer with only the language loss; returns the exported policy folder."""
    cmd = [sys.executable, "-m", "srdrl.train", "--output_dir", str(out),
           "--synthetic_scenes", str(num_scenes), "--seed", str(seed),
           "--rl_loss_weight", "0", "--traj_loss_weight", "0",
           "--consistency_loss_weight", "0", "--eval_samples", "0", *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out / "policy"


def held_out_scenes(cfg: SyntheticDataConfig, first: int, count: int) -> list[dict]:
    """Scenes ``first ..`` drawn as srdrl-make-data draws them, with a hazard-free frame."""
    K, T = synthetic_camera(cfg)
    scenes = []
    for i in range(first, first + count):
        rng = np.random.default_rng([cfg.seed, i])
        scene = sample_scene(rng)
        real = render_frames(scene, K, T, cfg.width, cfg.height, cfg.frames, rng)
        bare = copy.copy(scene)
        bare.hazards = []
        road = render_frames(bare, K, T, cfg.width, cfg.height, cfg.frames,
                             np.random.default_rng([cfg.seed, i, 2]))
        scenes.append({"reasoning": scene.reasoning, "history": scene.history,
                       "real": np.stack(real), "road": np.stack(road)})
    return scenes


def word_targets(policy: VLAPolicy, text: str) -> dict[str, tuple[int, int]]:
    """Per word class: (index of the word's first token in the reasoning, its token id)."""
    enc = policy.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    found = {}
    for name, words in WORDS.items():
        m = re.search(r"\b(" + "|".join(words) + r")\b", text)
        if m is None:
            continue
        k = next(k for k, (a, b) in enumerate(enc["offset_mapping"]) if a <= m.start() < b)
        found[name] = (k, enc["input_ids"][k])
    return found


def class_ids(policy: VLAPolicy) -> dict[str, list[int]]:
    """First token id of each class word as it appears mid-sentence (after a space)."""
    ids = {}
    for name, words in WORDS.items():
        first = [policy.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]
                 for w in words]
        if len(set(first)) != len(first):
            raise SystemExit(f"the tokenizer does not tell the {name} words apart by their "
                             f"first token: {dict(zip(words, first, strict=True))}")
        ids[name] = first
    return ids


@torch.no_grad()
def next_token_logits(policy: VLAPolicy, scenes: list[dict], frames: str) -> list[torch.Tensor]:
    """Per scene, the logits (R, vocab) that predict its R reasoning tokens."""
    batch = {
        "images": torch.from_numpy(np.stack([s[frames] for s in scenes])),  # (B, F, H, W, 3)
        "ego_history_xyz": torch.tensor(np.stack([s["history"] for s in scenes])).float(),
        "reasoning_text": [s["reasoning"] for s in scenes],
    }
    inputs = policy.build_inputs(batch)
    model = policy.vlm.model
    rope_kwargs = dict(image_grid_thw=inputs.image_grid_thw,
                       attention_mask=inputs.attention_mask)
    if _ROPE_INDEX_TAKES_TYPES:  # as VLAPolicy.encode_prefix calls it
        rope_kwargs["mm_token_type_ids"] = inputs.mm_token_type_ids
    position_ids, _ = model.get_rope_index(inputs.input_ids, **rope_kwargs)  # (3, B, L)
    hidden = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                   position_ids=position_ids, pixel_values=inputs.pixel_values,
                   image_grid_thw=inputs.image_grid_thw,
                   mm_token_type_ids=inputs.mm_token_type_ids,
                   use_cache=False).last_hidden_state  # (B, L, D)
    out = []
    for b in range(len(scenes)):
        labelled = (inputs.labels[b] != IGNORE_INDEX).nonzero()[:, 0]  # reasoning + closing
        start = int(labelled[0])
        out.append(policy.vlm.lm_head(hidden[b, start - 1: int(labelled[-1])]).float())
    return out


def evaluate(policy: VLAPolicy, scenes: list[dict], batch_size: int = 16) -> dict:
    policy.eval()
    ids = class_ids(policy)
    targets = [word_targets(policy, s["reasoning"]) for s in scenes]
    result = {}
    for frames in ("real", "road"):
        hits = {name: {"class": [], "vocab": []} for name in WORDS}
        for lo in range(0, len(scenes), batch_size):
            logits = next_token_logits(policy, scenes[lo: lo + batch_size], frames)
            for row, found in zip(logits, targets[lo: lo + batch_size], strict=True):
                for name, (k, token) in found.items():
                    choice = ids[name][int(row[k, ids[name]].argmax())]
                    hits[name]["class"].append(choice == token)
                    hits[name]["vocab"].append(int(row[k].argmax()) == token)
        result[frames] = {name: {kind: float(np.mean(v)) for kind, v in h.items()}
                          for name, h in hits.items()}
    for name in WORDS:
        truth = [found[name][1] for found in targets if name in found]
        shares = [truth.count(t) / len(truth) for t in set(truth)]
        result.setdefault("chance", {})[name] = max(shares)
        result.setdefault("count", {})[name] = len(truth)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", help="a trained policy folder; default: train one")
    parser.add_argument("--num_scenes", type=int, default=400,
                        help="synthetic scenes the trainer generates (train + val)")
    parser.add_argument("--held_out", type=int, default=200, help="held-out scenes read")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and training")
    parser.add_argument("--work_dir", default="bench_out/seeing_check",
                        help="where the trainer writes its data and policy")
    parser.add_argument("trainer_args", nargs="*", help="after --: flags for srdrl.train")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    policy_dir = Path(args.policy) if args.policy else train_language_only(
        Path(args.work_dir), args.num_scenes, args.seed, args.trainer_args)
    train_s = time.perf_counter() - start
    torch.manual_seed(args.seed)
    policy = VLAPolicy.from_pretrained(policy_dir)
    cfg = SyntheticDataConfig(output_dir="", seed=args.seed)
    scenes = held_out_scenes(cfg, args.num_scenes, args.held_out)
    result = evaluate(policy, scenes)
    image_tokens = policy.input_builder.images(torch.from_numpy(scenes[0]["real"][None]))[1]
    payload = {
        "policy": str(policy_dir), "trained_here": args.policy is None,
        "trainer_args": args.trainer_args, "num_scenes": args.num_scenes,
        "held_out": args.held_out, "seed": args.seed,
        "image_tokens_per_frame": int(image_tokens.prod() // policy.config.spatial_merge_size**2),
        "train_seconds": round(train_s, 1), "total_seconds": round(time.perf_counter() - start, 1),
        **result,
    }
    print(f"{'word':6s} {'n':>4s} {'chance':>7s}  {'real class':>10s} {'road class':>10s}  "
          f"{'real vocab':>10s} {'road vocab':>10s}")
    for name in WORDS:
        print(f"{name:6s} {result['count'][name]:4d} {result['chance'][name]:7.3f}  "
              f"{result['real'][name]['class']:10.3f} {result['road'][name]['class']:10.3f}  "
              f"{result['real'][name]['vocab']:10.3f} {result['road'][name]['vocab']:10.3f}")
    print(json.dumps({k: payload[k] for k in ("image_tokens_per_frame", "train_seconds",
                                              "total_seconds")}))
    print(write_json("seeing_check", payload))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
