"""srdrl: Self-Reflective Denoising RL for vision-language-action driving policies."""

__version__ = "0.1.0"
