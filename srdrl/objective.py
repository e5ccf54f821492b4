"""The SRD-RL objective: language + trajectory + consistency + RL (AWR) losses.

    total = language
          + traj_loss_weight        * flow_matching(label)
          + rl_loss_weight          * AWR
          + consistency_loss_weight * InfoNCE(vision, language, trajectory)

AWR (docs/DESIGN.md, "The RL loss"): candidates per scene are the label (index 0) plus N policy
samples drawn under no_grad from the same prefix; each is scored by ``srdrl.rewards``;
advantage = reward - the scene's mean (optionally / its std). Mode ``best`` trains toward
the argmax candidate with weight min(exp(A / temperature), max_weight); mode ``all``
trains toward every candidate with that weight. The AWR loss is the flow-matching MSE
toward the chosen candidates' actions, with gradient through the expert (and through the
prefix into the VLM unless the policy stops it). A sampled candidate's action is the one
the sampler produced it from; the label's is ``traj_to_action`` of the label.

Label-relative options (each off by default, the seed's behaviour): ``candidate_noise
"trajectory"`` explores with whole-path noise after sampling (``srdrl.exploration``);
``awr_baseline "label"`` measures advantages against the label's reward and weights only
candidates that beat it; ``lower_traj_weight_when_beaten`` scales the supervised loss of a
scene whose label some candidate beats by ``beaten_traj_weight``.

Self-reflective rollouts (``rollout_reasoning = "generated"``): before sampling, the
policy generates its own reasoning from the images (greedy unless a rollout temperature is
set), the candidates are denoised against the prefix of prompt + that text, and the danger
and intent rewards read it; the language loss still teacher-forces the dataset's text, and
the AWR term fits the chosen candidates under the step's own (teacher-forced, differentiable)
prefix: the generated prefix only draws and scores them (no_grad). The metrics then include
how often the generated text states the dataset text's manoeuvre and hazard side
(``reasoning_manoeuvre_agreement``, ``reasoning_side_agreement``).

``rl_loss_weight = 0`` samples nothing and scores nothing (unless the trust gate scales
the supervised loss): the result is the supervised loss, bit for bit.

How candidates are drawn and scored is passed in (``sample_candidates``, ``scorer``), so
the trainer decides where sampling runs for its ZeRO stage (``srdrl.engine``) and tests
or benchmarks substitute their own without touching module globals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srdrl.anchors import anchor_candidates
from srdrl.config import ObjectiveConfig, RewardConfig
from srdrl.data.dataset import scored_images
from srdrl.exploration import trajectory_noise
from srdrl.policy.compiled_layers import eager_layers
from srdrl.policy.generation import generate_reasoning, reasoning_prefix
from srdrl.policy.model import Prefix, VLAPolicy
from srdrl.policy.sampler import sample_trajectories
from srdrl.reasoning_facts import agreement
from srdrl.rewards import RewardTerms, score_candidates
from srdrl.timing import NULL_TIMER


def advantages(reward: torch.Tensor, normalize: bool, baseline: str = "mean") -> torch.Tensor:
    """reward (B, C) minus the scene's mean (``baseline`` 'mean') or minus the label's own
    reward, candidate 0 ('label'), optionally over the scene's std. Ties give zeros."""
    base = reward[:, :1] if baseline == "label" else reward.mean(dim=1, keepdim=True)
    adv = reward - base
    if normalize:
        std = reward.std(dim=1, keepdim=True, unbiased=False)
        adv = torch.where(std > 1e-8, adv / std.clamp_min(1e-8), torch.zeros_like(adv))
    return adv


def awr_weights(adv: torch.Tensor, temperature: float, max_weight: float) -> torch.Tensor:
    """min(exp(A / temperature), max_weight), computed without overflow."""
    return torch.exp((adv / temperature).clamp(max=torch.log(torch.tensor(max_weight)).item()))


def candidate_weights(adv: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """AWR weights (B, C) of advantages (B, C): min(exp(A / T), max); with the label
    baseline only candidates that beat the label (A > 0) keep theirs, the rest get 0."""
    weights = awr_weights(adv, cfg.awr_temperature, cfg.awr_max_weight)
    if cfg.awr_baseline == "label":
        weights = torch.where(adv > 0, weights, torch.zeros_like(weights))
    return weights


def label_beaten(reward: torch.Tensor) -> torch.Tensor:
    """(B,) bool: some policy candidate's reward exceeds the label's (candidate 0)."""
    return (reward[:, 1:] > reward[:, :1]).any(dim=1)


def supervised_scene_weights(cfg: ObjectiveConfig, gt_weight: torch.Tensor | None,
                             beaten: torch.Tensor | None) -> torch.Tensor | None:
    """Per-scene weight (B,) of the supervised trajectory loss, or None for plain 1: the
    gate's label weight (``gate_supervised_loss``) times beaten_traj_weight where a
    candidate beats the label (``lower_traj_weight_when_beaten``)."""
    weight = gt_weight if cfg.gate_supervised_loss else None
    if cfg.lower_traj_weight_when_beaten and beaten is not None:
        lowered = torch.where(beaten, cfg.beaten_traj_weight, 1.0)
        weight = lowered if weight is None else weight * lowered.to(weight)
    return weight


class ConsistencyHeads(nn.Module):
    """Small projections of pooled vision, language and trajectory features to one space."""

    def __init__(self, vision_dim: int, language_dim: int, trajectory_dim: int, dim: int = 64):
        super().__init__()
        self.vision = nn.Linear(vision_dim, dim)
        self.language = nn.Linear(language_dim, dim)
        self.trajectory = nn.Linear(trajectory_dim, dim)

    @classmethod
    def for_policy(cls, policy: VLAPolicy, dim: int = 64) -> ConsistencyHeads:
        c = policy.config
        return cls(c.text_hidden_size, c.text_hidden_size, c.expert_hidden_size, dim)


def _gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows (differentiable) and this rank's offset; a no-op without a group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank() * x.shape[0]


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between matching rows of a and b (B, D), negatives from all ranks."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    all_a, offset = _gather_rows(a)
    all_b, _ = _gather_rows(b)
    target = torch.arange(a.shape[0], device=a.device) + offset
    loss_ab = F.cross_entropy(a @ all_b.T / temperature, target)
    loss_ba = F.cross_entropy(b @ all_a.T / temperature, target)
    return 0.5 * (loss_ab + loss_ba)


def trajectory_features(policy: VLAPolicy, actions: torch.Tensor) -> torch.Tensor:
    """Pooled embedding (B, expert_hidden) of clean actions (B, 64, 2) by action_in_proj."""
    t = torch.ones(actions.shape[0], device=actions.device)
    return policy.action_in_proj(actions, t).mean(dim=1)


def consistency_loss(heads: ConsistencyHeads, prefix: Prefix, traj_feat: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Mean of the three pairwise InfoNCE losses."""
    v = heads.vision(prefix.vision_features.to(heads.vision.weight.dtype))
    lang = heads.language(prefix.language_features.to(heads.language.weight.dtype))
    tr = heads.trajectory(traj_feat.to(heads.trajectory.weight.dtype))
    return (info_nce(v, lang, temperature) + info_nce(v, tr, temperature)
            + info_nce(lang, tr, temperature)) / 3.0


def _score(scorer, batch, candidates, label, cfg: RewardConfig, texts: list[str]
           ) -> RewardTerms:
    device = candidates.device
    return scorer(
        scored_images(batch).to(device), candidates, label,
        batch["ego_history_xyz"].to(device), batch["K"].to(device),
        batch["T_cam_from_ego"].to(device), list(texts), cfg,
    )


@torch.no_grad()
def self_reflective_prefix(policy: VLAPolicy, batch: dict, cfg: ObjectiveConfig, generator
                           ) -> tuple[Prefix, list[str], dict[str, torch.Tensor]]:
    """The policy's own reasoning for the batch, the prefix of prompt + that reasoning, and
    metrics (0-d tensors): the text's agreement with the dataset's and the share of scenes
    whose generation ended at a stop token."""
    with eager_layers():  # compiled layers (--compile_layers) would recompile per token
        reasoning = generate_reasoning(policy, batch, temperature=cfg.rollout_temperature,
                                       top_p=cfg.rollout_top_p, generator=generator)
    prefix = reasoning_prefix(policy, batch, "generated", reasoning)
    agree = agreement(reasoning.texts, list(batch["reasoning_text"]))
    agree["stopped"] = sum(reasoning.stopped) / len(reasoning.stopped)
    metrics = {f"reasoning_{k}": torch.tensor(float(v), device=policy.device)
               for k, v in agree.items()}
    return prefix, reasoning.texts, metrics


def srdrl_loss(
    policy: VLAPolicy,
    heads: ConsistencyHeads | None,
    batch: dict,
    cfg: ObjectiveConfig,
    reward_cfg: RewardConfig,
    generator: torch.Generator | None = None,
    timer=NULL_TIMER,
    sample_candidates=None,
    scorer=score_candidates,
    anchors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss for one batch and its metrics (floats, for logging).

    ``sample_candidates(batch, generator, prefix)`` draws the policy's candidates (actions
    (B, N, 64, 2), trajectories (B, N, 64, 3)) from this step's prefix (default:
    ``sample_trajectories`` with ``cfg``'s settings; the trainer passes
    ``SRDRLModule.sample_candidates``, which knows the ZeRO stage). ``scorer`` has the
    signature of ``srdrl.rewards.score_candidates``. ``anchors`` (K, 64, 2), normalised
    actions (``srdrl.anchors.anchor_vocabulary``), are scored after the samples when
    ``cfg.num_anchors`` is K > 0.
    ``timer.section(name)`` brackets the phases (vlm_forward, supervised, sampling,
    scoring, awr) for benchmarks.
    """
    if sample_candidates is None:
        def sample_candidates(batch, generator, prefix):
            return sample_trajectories(
                policy, batch, cfg.num_trajectory_samples, steps=cfg.flow_steps,
                noise_scale_step=cfg.noise_scale_step, generator=generator,
                use_cuda_graph=cfg.use_cuda_graph, prefix=prefix)
    if cfg.num_anchors and (anchors is None or anchors.shape[0] != cfg.num_anchors):
        raise ValueError(f"num_anchors is {cfg.num_anchors} but the anchors given are "
                         f"{None if anchors is None else tuple(anchors.shape)}")
    device = policy.device
    label = batch["trajectory"].to(device=device, dtype=torch.float32)  # (B, T, 3)
    history = batch["ego_history_xyz"].to(device=device, dtype=torch.float32)
    with timer.section("vlm_forward"):
        prefix = policy.encode_prefix(batch)
    with timer.section("supervised"), torch.no_grad():
        label_actions = policy.action_space.traj_to_action(label, history)  # (B, T, 2)

    # Supervised draws first, so that they are the same whatever the RL term. With the RL
    # term, the label's flow-matching loss runs in the AWR's expert call (one expert
    # forward and backward per step, not two).
    with timer.section("supervised"):
        label_draws = policy.flow_draws(label_actions, generator)
        traj_per_scene = None
        if cfg.rl_loss_weight <= 0:
            traj_per_scene = policy.flow_matching_loss(prefix, label_actions, reduction="none",
                                                       draws=label_draws)  # (B,)
        consistency = label.new_zeros(())
        use_consistency = cfg.consistency_loss_weight > 0 and heads is not None
        if use_consistency:
            feats = trajectory_features(policy, label_actions)
            consistency = consistency_loss(heads, prefix, feats, cfg.consistency_temperature)

    metrics: dict[str, torch.Tensor] = {}
    awr = label.new_zeros(())
    gt_weight = beaten = None
    if cfg.rl_loss_weight > 0:
        texts = list(batch["reasoning_text"])  # what the danger and intent rewards read
        rollout_prefix = prefix
        if cfg.rollout_reasoning == "generated":
            with timer.section("generation"):
                rollout_prefix, texts, agree = self_reflective_prefix(policy, batch, cfg,
                                                                      generator)
            metrics.update(agree)
        with torch.no_grad(), timer.section("sampling"):  # not differentiated
            samples = sample_candidates(batch, generator, rollout_prefix.detach())
        actions, trajs = (x.to(device) for x in samples)
        if cfg.candidate_noise == "trajectory":
            with timer.section("sampling"):
                actions, trajs = trajectory_noise(
                    actions, trajs, history, policy.action_space, cfg.candidate_scale_std,
                    cfg.candidate_offset_std, generator)
        if cfg.num_anchors:
            with timer.section("sampling"):
                anchor_actions, anchor_trajs = anchor_candidates(anchors, history,
                                                                 policy.action_space)
            actions = torch.cat([actions, anchor_actions.to(actions.dtype)], dim=1)
            trajs = torch.cat([trajs, anchor_trajs.to(trajs.dtype)], dim=1)
        # C = 1 + N (+ K anchors) candidates, the label first
        candidates = torch.cat([label[:, None], trajs], dim=1)  # (B, C, T, 3)
        cand_actions = torch.cat([label_actions[:, None], actions], dim=1)  # (B, C, T, 2)
        with timer.section("scoring"):
            terms = _score(scorer, batch, candidates, label, reward_cfg, texts)
        with timer.section("awr"):
            adv = advantages(terms.reward, cfg.normalize_advantage, cfg.awr_baseline)
            weights = candidate_weights(adv, cfg)  # (B, C)
            if cfg.awr_mode == "best":
                best = terms.reward.argmax(dim=1)  # (B,)
                rows = torch.arange(best.shape[0], device=device)
                weights = weights[rows, best]  # (B,)
                targets = cand_actions[rows, best][:, None]  # (B, 1, T, 2)
            else:
                targets = cand_actions  # (B, C, T, 2)
            traj_per_scene, awr = label_and_awr_losses(policy, prefix, label_actions,
                                                       label_draws, targets, weights,
                                                       generator)
        gt_weight, beaten = terms.gt_weight, label_beaten(terms.reward)
        metrics.update(_reward_metrics(terms, adv, weights, beaten, batch, cfg.num_anchors))
    elif cfg.gate_supervised_loss:  # the gate needs the label's own safety and danger
        gt_weight = _score(scorer, batch, label[:, None], label, reward_cfg,
                           batch["reasoning_text"]).gt_weight

    scene_weight = supervised_scene_weights(cfg, gt_weight, beaten)
    if scene_weight is not None:
        traj = (traj_per_scene * scene_weight.to(traj_per_scene)).mean()
    else:
        traj = traj_per_scene.mean()
    total = prefix.language_loss + cfg.traj_loss_weight * traj
    if use_consistency:
        total = total + cfg.consistency_loss_weight * consistency
    if cfg.rl_loss_weight > 0:
        total = total + cfg.rl_loss_weight * awr
    metrics.update(loss=total, language_loss=prefix.language_loss, traj_loss=traj,
                   consistency_loss=consistency, awr_loss=awr)
    values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()]).tolist()
    return total, dict(zip(metrics, values, strict=True))  # one host sync for all metrics


def label_and_awr_losses(policy: VLAPolicy, prefix, label_actions: torch.Tensor,
                         label_draws: tuple, targets: torch.Tensor, weights: torch.Tensor,
                         generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The label's per-scene flow-matching loss (B,) and the AWR loss (the mean over
    targets (B, K, 64, 2) of weight (B,) or (B, K) x loss) from one expert call over each
    scene's label and its K targets. The targets' draws follow the label's (drawn before
    sampling), so every number equals that of two separate calls."""
    target_draws = policy.flow_draws(targets, generator)
    actions = torch.cat([label_actions[:, None], targets], dim=1)  # (B, 1 + K, T, 2)
    draws = tuple(torch.cat(pair, dim=1) for pair in zip(label_draws, target_draws, strict=True))
    per = policy.flow_matching_loss(prefix, actions, reduction="none", draws=draws)  # (B, 1+K)
    awr_weights = weights[:, None] if weights.dim() == 1 else weights
    return per[:, 0], (per[:, 1:] * awr_weights.to(per)).mean()


def _reward_metrics(terms: RewardTerms, adv: torch.Tensor, weights: torch.Tensor,
                    beaten: torch.Tensor, batch: dict, num_anchors: int = 0) -> dict:
    """Reward metrics as 0-d tensors. gt_sim averages the candidates other than the label
    (the label's own is 1); visible_fraction counts candidates with at least one visible
    waypoint. Where the batch carries the evaluation-only ``label_noisy`` flags, two more
    metrics let a run's gate precision and recall be read from its log (they are logged,
    never used by the loss): label_noisy (share of noisy labels) and gate_fired_noisy
    (share of scenes where the gate fired on a noisy label). With ``num_anchors`` K (the
    last K candidates), anchor_is_best: the share of scenes whose best one is an anchor."""
    best = terms.reward.argmax(dim=1)
    flags = [e.get("label_noisy") for e in batch.get("eval", [])]
    optional = {}
    if flags and all(f is not None for f in flags):
        is_noisy = torch.tensor(flags, dtype=torch.bool, device=terms.reward.device)
        optional = {"label_noisy": is_noisy.float().mean(),
                    "gate_fired_noisy": (terms.gate_fired & is_noisy).float().mean()}
    if num_anchors:
        optional["anchor_is_best"] = (best >= terms.reward.shape[1] - num_anchors).float().mean()
    return {
        **optional,
        "label_beaten": beaten.float().mean(),
        "reward_mean": terms.reward.mean(),
        "reward_best": terms.reward.max(dim=1).values.mean(),
        "gt_is_best": (best == 0).float().mean(),
        "safety": terms.safety.mean(),
        "gt_sim": terms.gt_sim[:, 1:].mean(),
        "reasoning": terms.alignment.mean(),
        "awr_weight_mean": weights.mean(),
        "awr_weight_min": weights.min(),
        "awr_weight_max": weights.max(),
        "advantage_std": adv.std(unbiased=False),
        "visible_fraction": terms.visible.any(dim=-1).float().mean(),
        "gate_fired": terms.gate_fired.float().mean(),
        "gt_weight": terms.gt_weight.mean(),
    }
