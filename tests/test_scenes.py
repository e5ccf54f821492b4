"""Scene content: the reasoning says what the frame shows, and the frame shows it at the
tiny policy's input resolution (docs/DESIGN.md, "Data")."""

import re

import numpy as np
import torch
from transformers import Qwen2VLImageProcessorPil

from srdrl.camera import pixel_grid, unproject_to_ground
from srdrl.data.scenes import HAZARD_KINDS, sample_scene
from srdrl.data.synthetic import SyntheticDataConfig, synthetic_camera
from srdrl.policy.config import PolicyConfig
from srdrl.rewards import Intent, parse_intent

SIDE_WORDS = re.compile(r"\b(left|right)\b")
KIND_WORDS = re.compile(r"\b(" + "|".join(HAZARD_KINDS) + r")\b")


def _side(hazard, curvature):
    x, y = hazard.centre
    return "left" if y > curvature * x**2 / 2 else "right"


def test_reasoning_names_kind_and_side_of_the_hazard_and_nothing_else():
    seen = set()
    for i in range(400):
        scene = sample_scene(np.random.default_rng([21, i]))
        text = scene.reasoning
        assert not re.search(r"\d", text), text  # no distances: the frame cannot give metres
        in_path = [h for h in scene.hazards if h.in_path]
        beside = [h for h in scene.hazards if not h.in_path]
        named = in_path[0] if in_path else beside[0] if beside else None
        kinds = KIND_WORDS.findall(text)
        sides = SIDE_WORDS.findall(text)
        if named is None:
            assert kinds == [] and sides == [], text
            assert parse_intent(text) == Intent("straight", None)
            seen.add("clear")
            continue
        assert kinds == [named.kind], text
        if named.blocking:
            assert sides == [] and parse_intent(text) == Intent(None, "stop"), text
            seen.add("stop")
        elif named.in_path:  # the hazard's side first, then the way around it, the other
            other = {"left": "right", "right": "left"}[_side(named, scene.curvature)]
            assert sides == [_side(named, scene.curvature), other], text
            assert parse_intent(text) == Intent(other, None) and scene.intent == other
            seen.add("swerve")
        else:
            assert sides == [_side(named, scene.curvature)], text
            assert parse_intent(text) == Intent("straight", None)
            seen.add("distractor")
    assert seen == {"clear", "stop", "swerve", "distractor"}


def _tiny_input_grid(cfg: SyntheticDataConfig) -> tuple[int, int]:
    """(rows, cols) of vision patches the tiny preset makes of a generated frame."""
    config = PolicyConfig.tiny()
    processor = Qwen2VLImageProcessorPil(
        patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
        merge_size=config.spatial_merge_size,
        size={"shortest_edge": config.image_min_pixels,
              "longest_edge": config.image_max_pixels})
    frame = np.zeros((cfg.height, cfg.width, 3), np.uint8)
    _, rows, cols = processor(images=[frame], return_tensors="pt")["image_grid_thw"][0].tolist()
    return rows, cols


# Smallest share of the frame a hazard covers, and of its most covered vision patch (12 x
# 20 patches of the tiny input), over these 300 scenes when the floors were set: in the
# way 1.6 % and 0.68 (medians 3.7 %, 1.00); distractor 0.4 % and 0.30 (medians 1.0 %, 0.53).
IN_PATH_FLOOR = (0.015, 0.6)
DISTRACTOR_FLOOR = (0.003, 0.25)


def test_every_hazard_is_visible_at_the_tiny_input_resolution():
    cfg = SyntheticDataConfig(output_dir="")
    K, T = (torch.from_numpy(m) for m in synthetic_camera(cfg))
    ground, hits = unproject_to_ground(pixel_grid(cfg.width, cfg.height), K, T)
    x, y, hits = ground[..., 0].numpy(), ground[..., 1].numpy(), hits.numpy()
    rows, cols = _tiny_input_grid(cfg)
    assert rows * cols >= 200  # vision patches per frame (4 per image token)
    for i in range(300):
        scene = sample_scene(np.random.default_rng([23, i]))
        for h in scene.hazards:
            mask = (hits & h.contains(x, y, bounded=True)).astype(np.float64)  # (H, W)
            # share of each vision patch (area resampling onto the processed grid)
            ri = np.arange(cfg.height) * rows // cfg.height
            ci = np.arange(cfg.width) * cols // cfg.width
            patch = np.zeros((rows, cols))
            np.add.at(patch, (ri[:, None], ci[None, :]), mask)
            patch /= (cfg.height / rows) * (cfg.width / cols)
            share_floor, patch_floor = IN_PATH_FLOOR if h.in_path else DISTRACTOR_FLOOR
            assert mask.mean() >= share_floor, (i, h.kind, mask.mean())
            assert patch.max() >= patch_floor, (i, h.kind, patch.max())
            if h.in_path and not h.blocking:  # most of what shows lies on the named side
                left = (mask * (np.arange(cfg.width) < (cfg.width - 1) / 2)).sum() / mask.sum()
                assert (left > 0.5) == (_side(h, scene.curvature) == "left"), (i, left)
