"""srdrl: Self-Reflective Denoising RL for vision-language-action driving policies."""

from srdrl.policy.hub import register_auto_classes

__version__ = "0.1.0"

# AutoConfig / AutoModel.from_pretrained(folder) load a policy saved by srdrl
register_auto_classes()
