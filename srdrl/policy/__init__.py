"""The VLA policy: VLM, action expert, flow matching, the sampler and checkpoint layouts.

Names are imported on first use, so that ``import srdrl`` (which registers the checkpoint
config with transformers' Auto classes, see ``hub.py``) does not load the model code.
"""

from importlib import import_module

_EXPORTS = {
    "Denoiser": "srdrl.policy.sampler",
    "PolicyConfig": "srdrl.policy.config",
    "Prefix": "srdrl.policy.model",
    "SRDRLConfig": "srdrl.policy.hub",
    "VLAPolicy": "srdrl.policy.model",
    "build_tokenizer": "srdrl.policy.model",
    "detect_layout": "srdrl.policy.formats",
    "initial_noise": "srdrl.policy.sampler",
    "sample_trajectories": "srdrl.policy.sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'srdrl.policy' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
