"""Batch -> Qwen3-VL inputs, built locally (no processor from the hub).

One sequence per scene, Qwen's chat layout, teacher-forced on the reasoning:

    <|im_start|>system\\n{SYSTEM_PROMPT}<|im_end|>\\n<|im_start|>user\\n
    (<|vision_start|> <|image_pad|> x n_f <|vision_end|>) for each frame f, oldest first
    {ego motion: "Speed 4.2 m/s, yaw rate -0.03 rad/s."} {TASK_PROMPT}<|im_end|>\\n
    <|im_start|>assistant\\n{reasoning}<|im_end|>\\n<|traj_future_start|>

Labels are the reasoning tokens and the closing ``<|im_end|>`` (-100 elsewhere). Two
variants serve inference (docs/DESIGN.md, "Reasoning generation"): ``prompt`` stops after
``<|im_start|>assistant\\n`` and pads on the left, for ``generate``; ``with_reasoning``
puts given token ids (the generated reasoning, or none) where the dataset's text goes. The
expert's 64 action tokens conceptually follow ``<|traj_future_start|>``; the whole sequence
above is the prefix whose keys/values the expert reads. Sequences are right-padded with
``<|endoftext|>`` to a common length, rounded up to ``pad_to_multiple_of``.

Images go through ``Qwen2VLImageProcessorPil`` (Pillow; the default Qwen image processor and
``Qwen3VLProcessor`` need torchvision). Each image becomes grid_t * grid_h * grid_w patches
and grid_t * grid_h * grid_w / merge_size^2 ``<|image_pad|>`` tokens, which we expand here;
``mm_token_type_ids`` is 1 on those tokens, as the model requires with images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

from srdrl.action_space import estimate_v0
from srdrl.policy.config import PolicyConfig
from srdrl.policy.tokenizer import (
    IM_END,
    IM_START,
    IMAGE_PAD,
    PAD,
    TRAJ_FUTURE_START,
    VISION_END,
    VISION_START,
)
from srdrl.timegrid import DT

SYSTEM_PROMPT = (
    "You drive an off-road vehicle. Look at the camera frames, name the hazards on the "
    "track, then plan the path for the next 6.4 seconds."
)
TASK_PROMPT = "Where should we drive, and why?"
IGNORE_INDEX = -100


def ego_motion_text(speed: float, yaw_rate: float) -> str:
    # +0.0 turns a rounded -0.0 into 0.0, so "-0.00" never appears
    return f"Speed {round(speed, 1) + 0.0:.1f} m/s, yaw rate {round(yaw_rate, 2) + 0.0:+.2f} rad/s."


def template_texts() -> list[str]:
    """The fixed prompt text, for training the tokenizer beside the data's reasoning."""
    texts = [f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n"]
    for speed in (0.0, 1.5, 3.2, 4.7, 6.9, 8.4, 10.0, 12.3):
        for yaw in (-0.31, -0.08, 0.0, 0.05, 0.27):
            ego = ego_motion_text(speed, yaw)
            texts.append(f"{ego} {TASK_PROMPT}{IM_END}\n{IM_START}assistant\n")
    return texts


def ego_motion(history_xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speed (B,) m/s (the action space's v0 estimate) and yaw rate (B,) rad/s from the last
    five history poses (B, 16, 3): heading change between the first and last of their four
    segments over the 3 dt between the segments' midpoints; 0 where a segment is shorter than
    5 cm (standing still, heading undefined)."""
    history = history_xyz.detach().to(torch.float64)
    speed = estimate_v0(history)
    seg = history[..., -5:, :2].diff(dim=-2)  # (B, 4, 2)
    heading = torch.atan2(seg[..., 1], seg[..., 0])
    turn = torch.remainder(heading[..., -1] - heading[..., 0] + math.pi, 2 * math.pi) - math.pi
    moving = (seg.norm(dim=-1) > 0.05).all(-1)
    yaw_rate = torch.where(moving, turn / (3 * DT), torch.zeros_like(turn))
    return speed, yaw_rate


class _TensorFields:
    """Moving and pinning a dataclass whose fields are all tensors."""

    def to(self, device):
        """On ``device``; host to GPU from pinned memory the copies are asynchronous
        (stream-ordered: the step's kernels see them complete; the host is not held)."""
        to_gpu = torch.device(device).type == "cuda"
        return type(self)(**{f.name: getattr(self, f.name).to(device, non_blocking=to_gpu)
                             for f in fields(self)})

    def pin_memory(self):
        """In page-locked memory (``DataLoader(pin_memory=True)`` calls this), so that ``to``
        copies at the link's speed and without holding the host."""
        return type(self)(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


@dataclass
class VLMInputs(_TensorFields):
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 on real tokens (right padding)
    labels: torch.Tensor  # (B, L) long, reasoning + closing token, -100 elsewhere
    mm_token_type_ids: torch.Tensor  # (B, L) int, 1 on <|image_pad|>
    reasoning_mask: torch.Tensor  # (B, L) bool, the reasoning tokens (closing token excluded)
    pixel_values: torch.Tensor  # (sum of patches, C * temporal_patch * patch^2) float32
    image_grid_thw: torch.Tensor  # (B * F, 3) long


@dataclass
class PromptInputs(_TensorFields):
    """The prompt alone, for generating the reasoning (see ``VLMInputBuilder.prompt``)."""

    input_ids: torch.Tensor  # (B, P) long, left-padded
    attention_mask: torch.Tensor  # (B, P) long, 1 on real tokens
    mm_token_type_ids: torch.Tensor  # (B, P) int, 1 on <|image_pad|>
    pixel_values: torch.Tensor  # (sum of patches, C * temporal_patch * patch^2) float32
    image_grid_thw: torch.Tensor  # (B * F, 3) long


class VLMInputBuilder:
    """Turns a collated batch into ``VLMInputs``; holds the tokenizer and image processor."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, config: PolicyConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.merge_size = config.spatial_merge_size
        self.image_processor = Qwen2VLImageProcessorPil(
            patch_size=config.patch_size,
            temporal_patch_size=config.temporal_patch_size,
            merge_size=config.spatial_merge_size,
            size={
                "shortest_edge": config.image_min_pixels,
                "longest_edge": config.image_max_pixels,
            },
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
               (PAD, IM_END, IMAGE_PAD, VISION_START, VISION_END, TRAJ_FUTURE_START)}
        self.pad_id, self.im_end_id, self.image_pad_id = ids[PAD], ids[IM_END], ids[IMAGE_PAD]
        self.vision_start_id, self.vision_end_id = ids[VISION_START], ids[VISION_END]
        head = f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n"
        self.head_ids = self._encode([head])[0]
        self.tail_ids = self._encode(["\n"])[0] + [ids[TRAJ_FUTURE_START]]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, F, H, W, 3) -> pixel_values (patches, dim) float32, grid_thw (B*F, 3)."""
        if images.dtype != torch.uint8 or images.dim() != 5 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (B, F, H, W, 3), got {images.dtype} "
                             f"{tuple(images.shape)}")
        frames = images.detach().cpu().flatten(0, 1).numpy()  # (B*F, H, W, 3)
        out = self.image_processor(images=list(frames), return_tensors="pt")
        return out["pixel_values"].float(), out["image_grid_thw"].long()

    def _prompts(self, batch: dict) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
        """Per scene the token ids up to and including ``<|im_start|>assistant\\n``, and the
        images' pixel_values and grid_thw."""
        images = batch["images"]
        num_scenes, num_frames = images.shape[:2]
        pixel_values, grid_thw = self.images(images)
        image_tokens = (grid_thw.prod(-1) // self.merge_size**2).view(num_scenes, num_frames)
        speed, yaw_rate = ego_motion(batch["ego_history_xyz"])
        ego = self._encode([
            f"{ego_motion_text(float(v), float(w))} {TASK_PROMPT}{IM_END}\n{IM_START}assistant\n"
            for v, w in zip(speed.tolist(), yaw_rate.tolist(), strict=True)
        ])
        prompts = []
        for b in range(num_scenes):
            ids = list(self.head_ids)
            for n in image_tokens[b].tolist():
                ids += [self.vision_start_id] + [self.image_pad_id] * n + [self.vision_end_id]
            prompts.append(ids + ego[b])
        return prompts, pixel_values, grid_thw

    def _padded_length(self, lengths: list[int]) -> int:
        multiple = self.config.pad_to_multiple_of
        return -(-max(lengths) // multiple) * multiple

    def __call__(self, batch: dict) -> VLMInputs:
        """Teacher-forced on the dataset's reasoning (``batch["reasoning_text"]``)."""
        reasoning = list(batch["reasoning_text"])
        if len(reasoning) != batch["images"].shape[0]:
            raise ValueError(f"{len(reasoning)} reasoning texts for {batch['images'].shape[0]} "
                             "scenes")
        return self.with_reasoning(batch, self._encode(reasoning))

    def without_reasoning(self, batch: dict) -> VLMInputs:
        """The same layout with no reasoning at all: the assistant turn is only its closing
        token, so the expert sees prompt and images alone (the "none" mode)."""
        return self.with_reasoning(batch, [[] for _ in range(batch["images"].shape[0])])

    def with_reasoning(self, batch: dict, answers: list[list[int]]) -> VLMInputs:
        """Teacher-forced layout with the given reasoning token ids per scene (e.g. the
        policy's own generated ones, used as they came out so no re-tokenisation can change
        them), each cut to ``max_reasoning_tokens``."""
        prompts, pixel_values, grid_thw = self._prompts(batch)
        num_scenes = len(prompts)
        if len(answers) != num_scenes:
            raise ValueError(f"{len(answers)} reasoning token lists for {num_scenes} scenes")
        rows = []  # per scene: (ids, labels, reasoning flags)
        for ids, reasoning in zip(prompts, answers, strict=True):
            answer = list(reasoning)[: self.config.max_reasoning_tokens] + [self.im_end_id]
            labels = [IGNORE_INDEX] * len(ids) + answer + [IGNORE_INDEX] * len(self.tail_ids)
            is_reasoning = [False] * len(ids) + [True] * (len(answer) - 1) + [False] * (
                1 + len(self.tail_ids))
            rows.append((ids + answer + self.tail_ids, labels, is_reasoning))

        length = self._padded_length([len(r[0]) for r in rows])
        input_ids = torch.full((num_scenes, length), self.pad_id, dtype=torch.long)  # (B, L)
        labels = torch.full((num_scenes, length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
        reasoning_mask = torch.zeros((num_scenes, length), dtype=torch.bool)  # (B, L)
        attention_mask = torch.zeros((num_scenes, length), dtype=torch.long)  # (B, L)
        for b, (ids, lab, is_reasoning) in enumerate(rows):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids)
            labels[b, :n] = torch.tensor(lab)
            reasoning_mask[b, :n] = torch.tensor(is_reasoning)
            attention_mask[b, :n] = 1
        return VLMInputs(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            mm_token_type_ids=(input_ids == self.image_pad_id).int(),
            reasoning_mask=reasoning_mask,
            pixel_values=pixel_values,
            image_grid_thw=grid_thw,
        )

    def prompt(self, batch: dict) -> PromptInputs:
        """Everything up to and including ``<|im_start|>assistant\\n``, left-padded (the
        layout ``generate`` continues from: every row's next token goes in the same column)."""
        prompts, pixel_values, grid_thw = self._prompts(batch)
        length = self._padded_length([len(ids) for ids in prompts])
        input_ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)  # (B, P)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)  # (B, P)
        for b, ids in enumerate(prompts):
            input_ids[b, length - len(ids):] = torch.tensor(ids)
            attention_mask[b, length - len(ids):] = 1
        return PromptInputs(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_token_type_ids=(input_ids == self.image_pad_id).int(),
            pixel_values=pixel_values,
            image_grid_thw=grid_thw,
        )
