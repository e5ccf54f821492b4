"""Configuration dataclasses. Flag names keep the original trainer's (docs/DESIGN.md,
"Configuration and flags")."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

OPTIMIZERS = ("deepspeed_adamw", "torch_fused_adamw")
"""--optimizer values (srdrl.optimizer); the first is the default."""

DEFAULT_LEARNING_RATE = 3e-4
"""Peak learning rate of a run that starts from a checkpoint or the bench preset."""
TINY_LEARNING_RATE = 2e-3
"""Peak learning rate of the tiny preset, trained from random weights: at 3e-4 the README's
main job ended with a language loss of 1.3 and its generated reasoning named the hazard's
side in 20% of scenes (benchmarks/RESULTS.md)."""

FRAME_LAYOUTS = ("frames", "frames_then_scoring_image")
"""How a data line's frame_paths are read (srdrl/data/dataset.py)."""


def check_frame_paths_layout(layout: str) -> None:
    if layout not in FRAME_LAYOUTS:
        raise ValueError(f"frame_paths_layout must be one of {', '.join(FRAME_LAYOUTS)}, got "
                         f"{layout!r}")


@dataclass
class RewardConfig:
    """How candidates are scored and how far the labelled trajectory is trusted."""

    safety_reward_weight: float = 1.5
    """Weight of the visual path-safety reward (texture and colour along the path)."""
    gt_reward_weight: float = 0.5
    """Weight of the similarity to the labelled trajectory, scaled by the trust gate."""
    reasoning_reward_weight: float = 0.3
    """Weight of the agreement between a candidate's motion and the stated intent."""
    danger_threshold: float = 0.3
    """Danger confidence at or above which the gate may distrust the label."""
    unsafe_threshold: float = 0.3
    """The label's own path safety below which it counts as unsafe."""
    gt_trust_min: float = 0.1
    """Label weight when the reasoning names a danger with full confidence and the label
    looks unsafe."""
    gt_trust_max: float = 1.0
    """Label weight when it is trusted."""
    use_trust_gate: bool = True
    """Ablation: False keeps the label weight at gt_trust_max always."""
    gt_sim_scale: float = 2.0
    """gt_sim = exp(-ADE / gt_sim_scale), metres."""
    safety_patch_size: int = 32
    """Side of the square image patch scored around each waypoint, pixels."""
    texture_scale: float = 1000.0
    """Laplacian variance that counts as fully rough."""
    colour_scale: float = 0.5
    """Colour distance (in [0, 1] RGB units) that counts as fully inconsistent."""
    scoring_backend: str = "auto"
    """Path-safety backend: auto (Triton on CUDA, Kornia on CPU), triton, kornia, reference."""
    neutral_alignment: float = 0.5
    """Reasoning alignment given when the reasoning states no intent."""
    trust_gate_mode: str = "absolute"
    """When the gate distrusts a label whose reasoning names a danger: 'absolute' (the
    seed's rule: the label's own safety < unsafe_threshold) or 'relative' (no fixed
    threshold, nothing from the label flags: the best policy candidate's safety exceeds
    the label's by more than gate_safety_margin; never fires when the label is scored
    alone)."""
    gate_safety_margin: float = 0.1
    """Relative gate: how much safer than the label the best candidate must be."""

    def __post_init__(self):
        # Written so that NaN fails every check: a comparison with NaN is False.
        for name in ("safety_reward_weight", "gt_reward_weight", "reasoning_reward_weight"):
            if not 0.0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name, what in (("danger_threshold", "a danger confidence"),
                           ("unsafe_threshold", "a path-safety score"),
                           ("neutral_alignment", "an alignment score")):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is {what}, in [0, 1]; got {getattr(self, name)}")
        if not 0.0 <= self.gt_trust_min <= self.gt_trust_max <= 1.0:
            raise ValueError(
                f"need 0 <= gt_trust_min <= gt_trust_max <= 1 (fractions of the label's "
                f"reward; gt_reward_weight scales it), got {self.gt_trust_min} and "
                f"{self.gt_trust_max}"
            )
        for name in ("gt_sim_scale", "texture_scale", "colour_scale"):
            if not 0.0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        patch = self.safety_patch_size
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise ValueError(f"safety_patch_size must be an integer >= 1 (pixels), got {patch!r}")
        if self.trust_gate_mode not in ("absolute", "relative"):
            raise ValueError(f"trust_gate_mode must be 'absolute' or 'relative', got "
                             f"{self.trust_gate_mode!r}")
        if not 0.0 <= self.gate_safety_margin < 1.0:
            raise ValueError(f"gate_safety_margin must be in [0, 1) (safety units), got "
                             f"{self.gate_safety_margin}")
        if self.scoring_backend not in ("auto", "triton", "kornia", "reference"):
            raise ValueError(f"scoring_backend must be auto, triton, kornia or reference, got "
                             f"{self.scoring_backend!r}")


def config_summary(cfg) -> str:
    """One line per field, for the log."""
    return "\n".join(f"  {f.name} = {getattr(cfg, f.name)!r}" for f in fields(cfg))


@dataclass
class ObjectiveConfig:
    """The combined SRD-RL loss and the sampling that feeds its RL term."""

    traj_loss_weight: float = 1.0
    """Weight of flow matching toward the labelled trajectory (the supervised term)."""
    rl_loss_weight: float = 0.5
    """Weight of the AWR term; 0 gives plain supervised fine-tuning (no sampling at all)."""
    consistency_loss_weight: float = 0.1
    """Weight of the InfoNCE consistency between vision, language and trajectory features."""
    num_trajectory_samples: int = 4
    """Policy samples per scene (the label is one more candidate)."""
    flow_steps: int = 10
    """Euler steps of the sampler."""
    noise_scale_step: float = 0.2
    """Sample i of a scene starts from noise scaled by (1 + noise_scale_step * i)."""
    awr_mode: str = "best"
    """'best': train toward the argmax candidate; 'all': every candidate, weighted."""
    awr_temperature: float = 1.0
    """Advantage temperature: weight = exp(advantage / awr_temperature)."""
    awr_max_weight: float = 20.0
    """Upper clip of the AWR weight."""
    normalize_advantage: bool = False
    """Divide advantages by the scene's reward std (ties give zero advantage)."""
    gate_supervised_loss: bool = False
    """Scale each scene's supervised trajectory loss by its trust-gate label weight."""
    consistency_temperature: float = 0.1
    """InfoNCE temperature."""
    use_cuda_graph: bool = True
    """Replay the sampler's Euler loop from a CUDA graph on GPU."""
    rollout_reasoning: str = "dataset"
    """What the RL candidates condition on, and what the danger and intent rewards read:
    'dataset' (the data's reasoning, the seed's behaviour) or 'generated' (self-reflective:
    the policy first writes its own reasoning from the images, under no_grad). The language
    loss always teacher-forces the dataset's reasoning."""
    rollout_temperature: float = 0.0
    """Sampling temperature of the generated rollout reasoning; 0 is greedy decoding."""
    rollout_top_p: float = 1.0
    """Nucleus (top-p) of the generated rollout reasoning, when rollout_temperature > 0."""
    candidate_noise: str = "none"
    """Exploration beyond the sampler's start noise: 'none' (the seed's) or 'trajectory':
    every policy sample but the first is scaled per axis and shifted sideways as a whole
    (srdrl/exploration.py), so a candidate can leave the label's mode."""
    candidate_scale_std: float = 0.2
    """Trajectory noise: std of the per-candidate, per-axis scale (x and y times 1 + s eps)."""
    candidate_offset_std: float = 2.0
    """Trajectory noise: std (metres) of the per-candidate lateral offset, ramped in over 2 s."""
    awr_baseline: str = "mean"
    """What an advantage is measured against: 'mean' (the scene's mean reward, the seed's)
    or 'label' (the label's own reward: A = r - r_label, and only candidates with A > 0 get
    a weight; a scene whose label no candidate beats adds nothing to the AWR term)."""
    lower_traj_weight_when_beaten: bool = False
    """Scale the supervised trajectory loss of a scene by beaten_traj_weight when some policy
    candidate out-scores its label (needs the RL term)."""
    beaten_traj_weight: float = 0.1
    """Supervised loss weight in scenes whose label a candidate beats (1.0 in the others)."""
    num_anchors: int = 0
    """Anchor candidates per scene beside the policy's samples: k-means centres of the
    training labels' actions, rolled out from each scene's speed (srdrl/anchors.py); 0 (the
    default) scores the samples only. Needs the RL term."""

    def __post_init__(self):
        if self.rollout_reasoning not in ("dataset", "generated"):
            raise ValueError(f"rollout_reasoning must be 'dataset' or 'generated', got "
                             f"{self.rollout_reasoning!r}")
        if self.rollout_temperature < 0 or not 0.0 < self.rollout_top_p <= 1.0:
            raise ValueError(f"need rollout_temperature >= 0 and 0 < rollout_top_p <= 1, got "
                             f"{self.rollout_temperature} and {self.rollout_top_p}")
        for name in ("traj_loss_weight", "rl_loss_weight", "consistency_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_trajectory_samples < 1:
            raise ValueError(f"num_trajectory_samples must be >= 1, got "
                             f"{self.num_trajectory_samples}")
        if self.flow_steps < 1:
            raise ValueError(f"flow_steps must be >= 1, got {self.flow_steps}")
        if self.candidate_noise not in ("none", "trajectory"):
            raise ValueError(f"candidate_noise must be 'none' or 'trajectory', got "
                             f"{self.candidate_noise!r}")
        if self.awr_baseline not in ("mean", "label"):
            raise ValueError(f"awr_baseline must be 'mean' or 'label', got {self.awr_baseline!r}")
        if min(self.candidate_scale_std, self.candidate_offset_std) < 0 or not (
                0.0 <= self.beaten_traj_weight <= 1.0):
            raise ValueError("candidate_scale_std and candidate_offset_std must be >= 0 and "
                             "beaten_traj_weight in [0, 1]")
        if self.num_anchors < 0 or (self.num_anchors > 0 and self.rl_loss_weight <= 0):
            raise ValueError(f"num_anchors must be >= 0 and needs the RL term "
                             f"(rl_loss_weight > 0); got {self.num_anchors} with "
                             f"rl_loss_weight {self.rl_loss_weight}")
        if self.awr_mode not in ("best", "all"):
            raise ValueError(f"awr_mode must be 'best' or 'all', got {self.awr_mode!r}")
        if self.awr_temperature <= 0 or self.awr_max_weight <= 0:
            raise ValueError("awr_temperature and awr_max_weight must be positive")
        if self.consistency_temperature <= 0:
            raise ValueError("consistency_temperature must be positive")


@dataclass
class TrainConfig:
    """What to train on, for how long, and where results go."""

    data_path: str | None = None
    """Training JSONL. Empty: generate the synthetic off-road data in output_dir/data."""
    eval_data_path: str | None = None
    """Validation JSONL. Empty: val.jsonl beside data_path, when it exists."""
    frame_paths_layout: str = "frames"
    """How a line's frame_paths are read: frames (every entry a camera frame, the last at t0
    is scored) or frames_then_scoring_image (the original SRD-RL script's: frames, then the
    image the rewards score; a missing history is straight at 5 m/s)."""
    output_dir: str = "outputs/srdrl"
    """Checkpoints, metrics (metrics.jsonl, TensorBoard), the exported policy and the report."""
    policy: str = "tiny"
    """A policy preset (tiny, bench) built with random weights, or a local directory written
    by save_pretrained."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON config; batch sizes, learning rate and bf16 'auto' are filled in from
    these flags. Empty: the built-in srdrl/ds_config.json (ZeRO-2)."""
    zero_stage: int | None = None
    """Override the config's ZeRO stage (0, 1, 2 or 3)."""
    zero3_gather_expert_whole: bool = True
    """At ZeRO-3, gather the action expert's parameters as one unit per expert call (a
    DeepSpeed ZeRO-3 leaf module) instead of submodule by submodule; sampling calls the
    expert once per Euler step. The whole expert is then live at once while it runs. The
    ZeRO-3 step of the bench preset is 1.90x faster with it on one H200
    (benchmarks/RESULTS.md); losses are unchanged (tests/test_engine.py).
    --no_zero3_gather_expert_whole gathers submodule by submodule."""
    zero3_gather_vlm_layers_whole: bool | None = None
    """At ZeRO-3, gather each VLM decoder layer and vision block as one unit per call (ZeRO-3
    leaf modules) instead of submodule by submodule. The bench preset's ZeRO-3 step is 1.60x
    faster with it on one H200 (benchmarks/RESULTS.md); losses are unchanged
    (tests/test_engine.py). Unset (the default): on, unless --gradient_checkpointing is set,
    whose key/value recomputation calls a layer's projections outside the layer's own
    forward; 'true' or 'false' sets it (true with --gradient_checkpointing is an error)."""
    zero3_sampling_replica: bool = True
    """At ZeRO-3, sample from a copy of the action expert and projections (one whole copy
    per rank, refreshed from the gathered parameters before each step's forward pass), so
    that the Euler loop replays a CUDA graph as at ZeRO-0-2 instead of running eagerly
    through ZeRO-3's hooks (srdrl/policy/replica.py). Costs the expert's bf16 weights once
    more per rank. Losses are unchanged (tests/test_engine.py, on CPU and an H200); the
    bench preset's ZeRO-3 step is 1.62x faster with it on one H200
    (benchmarks/RESULTS.md). --no_zero3_sampling_replica samples through ZeRO-3's hooks,
    eagerly (for a model whose expert does not fit twice)."""
    optimizer: str = OPTIMIZERS[0]
    """Which AdamW steps the parameters: deepspeed_adamw (DeepSpeed builds it from the config's
    optimizer block; torch's foreach AdamW with torch_adam) or torch_fused_adamw (torch's
    fused AdamW kernel, built from that block's lr, betas, eps and weight_decay and handed to
    DeepSpeed as a client optimiser; ZeRO, clipping, bf16 and the schedule unchanged). A
    checkpoint resumes only with the optimizer it was saved with."""
    per_device_train_batch_size: int = 8
    """Scenes per device per micro-step."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimiser step."""
    num_train_epochs: float = 3.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimiser steps to run; -1 runs num_train_epochs."""
    learning_rate: float | None = None
    """Peak learning rate (AdamW). Empty: TINY_LEARNING_RATE (2e-3) for the tiny preset,
    which trains from random weights, else DEFAULT_LEARNING_RATE (3e-4)."""
    warmup_steps: int = 10
    """Linear warm-up steps, then cosine decay to 10% of the peak."""
    seed: int = 0
    """Seed of the model's initialisation, the data order and every rank's noise."""
    logging_steps: int = 10
    """Optimiser steps between metrics lines."""
    liger_kernels: bool = False
    """Run the VLM's and the expert's RMSNorm, SwiGLU and the VLM's rotary embedding on
    Liger-Kernel's fused Triton kernels (srdrl/policy/fused_kernels.py); CUDA only."""
    compile_layers: bool = False
    """torch.compile (inductor) the action expert's layers and the VLM text layers' MLPs and
    RMSNorms, module by module (srdrl/policy/compiled_layers.py); ZeRO stages 0-2, not with
    --liger_kernels. The bench preset's ZeRO-2 step is 1.13x faster with it on one H200
    (benchmarks/RESULTS.md); off by default because every process first compiles for tens
    of seconds (and on CPU inductor needs a C++ compiler)."""
    gradient_checkpointing: bool = False
    """Checkpoint the VLM's decoder layers (recompute activations in the backward pass); the
    prefix keys/values the expert reads are recomputed from each layer's input."""
    max_skipped_steps: int = 3
    """Stop the run when this many optimiser steps in a row were skipped by DeepSpeed for
    non-finite gradients (a non-finite loss, or a non-finite gradient at ZeRO-0, stops it
    at once)."""
    save_steps: int = 0
    """Optimiser steps between checkpoints; 0 saves only at the end."""
    resume: bool = False
    """Continue from the latest checkpoint in output_dir (same data order, RNG, scheduler)."""
    resume_from_checkpoint: str | None = None
    """Continue from exactly this checkpoint folder (e.g. output_dir/checkpoints/checkpoint-40),
    failing if it is incomplete or unreadable; implies --resume. Empty: --resume takes the
    checkpoint output_dir/checkpoints/latest names, or the newest complete one."""
    overwrite_output_dir: bool = False
    """Start over in an output_dir that holds a previous run: its checkpoints, metrics,
    TensorBoard logs, exported policy, eval report and train_config.json are deleted first
    (data/ is kept). Without this or --resume, a used output_dir is refused."""
    save_total_limit: int | None = None
    """Keep at most this many complete checkpoints, deleting the lowest steps after each save
    (never the one just written). Empty: keep every checkpoint."""
    stop_after_steps: int = -1
    """Save a checkpoint and stop after this many optimiser steps, leaving the schedule of
    the full run unchanged (for time-sliced jobs: run again with --resume); -1: run to
    the end."""
    synthetic_scenes: int = 800
    """Scenes to generate when data_path is empty."""
    synthetic_label_noise: float = 0.3
    """Label noise of the generated scenes."""
    dataloader_workers: int = 2
    """Worker processes that read images and build the VLM inputs ahead of the step."""
    eval_samples: int = 4
    """Trajectories sampled per validation scene by the final evaluation; 0 skips it."""
    local_rank: int = -1
    """Set by the deepspeed launcher."""

    def __post_init__(self):
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        check_frame_paths_layout(self.frame_paths_layout)
        if self.learning_rate is None:
            self.learning_rate = (TINY_LEARNING_RATE if self.policy == "tiny"
                                  else DEFAULT_LEARNING_RATE)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                             f"{self.optimizer!r}")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("per_device_train_batch_size and gradient_accumulation_steps "
                             "must be >= 1")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 (use epochs) or > 0, got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError("num_train_epochs must be > 0 when max_steps is -1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.zero3_gather_vlm_layers_whole is None:
            self.zero3_gather_vlm_layers_whole = not self.gradient_checkpointing
        if self.zero3_gather_vlm_layers_whole and self.gradient_checkpointing:
            raise ValueError("zero3_gather_vlm_layers_whole cannot be used with "
                             "gradient_checkpointing (its key/value recomputation calls a "
                             "layer's projections outside the layer's forward)")
        if self.dataloader_workers < 0:
            raise ValueError(f"dataloader_workers must be >= 0, got {self.dataloader_workers}")
        if self.max_skipped_steps < 1:
            raise ValueError(f"max_skipped_steps must be >= 1, got {self.max_skipped_steps}")
        if self.logging_steps < 1 or self.save_steps < 0 or self.warmup_steps < 0:
            raise ValueError("logging_steps must be >= 1, save_steps and warmup_steps >= 0")
        if self.data_path is not None and not self.data_path:
            self.data_path = None
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 (or unset to keep every "
                             f"checkpoint), got {self.save_total_limit}")
        if self.resume_from_checkpoint is not None and not self.resume_from_checkpoint:
            self.resume_from_checkpoint = None
        if self.resume_from_checkpoint is not None:
            self.resume = True
        if self.resume and self.overwrite_output_dir:
            raise ValueError("--resume/--resume_from_checkpoint continue the run in output_dir "
                             "and --overwrite_output_dir deletes it; pass one of them")


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass, read from its source."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@dataclass
class EvalConfig:
    """What srdrl-eval evaluates, on which scenes, and where its report and pictures go.
    The trust gate's thresholds and the scoring backend come from RewardConfig."""

    policy: str
    """Policy directory written by save_pretrained (srdrl-train writes OUTPUT_DIR/policy);
    local only."""
    data_path: str
    """Validation JSONL with the evaluation fields clean_trajectory and hazards."""
    frame_paths_layout: str = "frames"
    """How a line's frame_paths are read: frames (every entry a camera frame, the last at t0
    is scored) or frames_then_scoring_image (the original SRD-RL script's: frames, then the
    image the rewards score; a missing history is straight at 5 m/s)."""
    output_dir: str | None = None
    """Where eval_report.json, eval_scenes.jsonl and pictures/ go. Empty: POLICY/eval."""
    train_data_path: str | None = None
    """Training JSONL for the trust-gate diagnostics. Empty: train.jsonl beside data_path,
    when it exists; 'none' skips them."""
    metrics: str | None = None
    """metrics.jsonl of the training run to plot. Empty: POLICY/../metrics.jsonl, when it
    exists."""
    num_samples: int = 4
    """Trajectories sampled per scene; the first is the prediction, min-ADE takes the best."""
    batch_size: int = 8
    """Scenes per batch."""
    pictures: int = 6
    """Scenes to draw; 0 draws no pictures."""
    seed: int = 0
    """Seed of the sampling noise: scene i's trajectories start from noise keyed by (seed,
    i), the same in every reasoning mode and frame variant."""
    num_seeds: int = 3
    """Evaluate with the noise seeds seed .. seed + num_seeds - 1; metrics are their mean,
    the report gives each seed's values and the spread."""
    reasoning_modes: list[str] = field(default_factory=lambda: ["generated", "oracle", "none"])
    """Reasoning modes to report, side by side, the first being the headline: generated
    (the policy writes its own reasoning), oracle (the dataset's text teacher-forced: a
    diagnostic), none (no reasoning in the prefix)."""
    image_ablation: bool = True
    """Also evaluate with every scene's frames replaced by one hazard-free road and with
    frames shuffled across scenes."""
    max_new_tokens: int = 0
    """Most reasoning tokens generated per scene; 0: the policy's max_reasoning_tokens."""
    temperature: float = 0.0
    """Sampling temperature of the generated reasoning; 0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus (top-p) of the generated reasoning's sampling, when temperature > 0."""
    compile_decode: bool = False
    """On GPU, generate with a static KV cache and a torch.compile'd decode step replayed
    from CUDA graphs (transformers' own); the first batch of each shape compiles."""

    def __post_init__(self):
        check_frame_paths_layout(self.frame_paths_layout)
        modes = ("generated", "oracle", "none")
        if (not self.reasoning_modes or any(m not in modes for m in self.reasoning_modes)
                or len(set(self.reasoning_modes)) != len(self.reasoning_modes)):
            raise ValueError(f"reasoning_modes must be distinct values of {modes}, got "
                             f"{self.reasoning_modes}")
        if self.num_seeds < 1 or self.max_new_tokens < 0:
            raise ValueError(f"num_seeds must be >= 1 and max_new_tokens >= 0, got "
                             f"{self.num_seeds} and {self.max_new_tokens}")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got "
                             f"{self.temperature} and {self.top_p}")
        if self.num_samples < 1 or self.batch_size < 1 or self.pictures < 0:
            raise ValueError(f"num_samples and batch_size must be >= 1 and pictures >= 0, got "
                             f"{self.num_samples}, {self.batch_size} and {self.pictures}")
        for name in ("output_dir", "train_data_path", "metrics"):
            if getattr(self, name) == "":
                setattr(self, name, None)
