"""The VLA policy: VLM, action expert, flow matching and the sampler."""

from srdrl.policy.config import PolicyConfig
from srdrl.policy.model import Prefix, VLAPolicy, build_tokenizer
from srdrl.policy.sampler import Denoiser, initial_noise, sample_trajectories

__all__ = [
    "Denoiser",
    "PolicyConfig",
    "Prefix",
    "VLAPolicy",
    "build_tokenizer",
    "initial_noise",
    "sample_trajectories",
]
