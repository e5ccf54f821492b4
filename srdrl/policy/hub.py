"""Hugging Face conventions for srdrl's own checkpoint layout.

``SRDRLConfig`` is the ``config.json`` of that layout: ``model_type`` 'srdrl_vla', every
``PolicyConfig`` field as an attribute, and the VLM's ``Qwen3VLConfig`` under
``vlm_config``. ``register_auto_classes`` (run by ``import srdrl``) registers it with
``AutoConfig`` and ``AutoModel``, so ``AutoModel.from_pretrained(folder)`` returns a
``VLAPolicy``. ``VLAPolicy`` stays an ``nn.Module`` rather than a ``PreTrainedModel``:
its config is a validated dataclass used throughout, and its loading (three layouts,
tokenizer-dependent vocabulary, strict names) is its own; what ``AutoModel`` needs is only a
class with ``config_class`` and ``from_pretrained``, which ``AutoVLAPolicy`` is, importing
the model code when first used so that ``import srdrl`` stays light. ``push_to_hub`` uploads
what ``save_pretrained`` writes, through ``huggingface_hub``.
"""

from __future__ import annotations

import dataclasses
import tempfile

from transformers import AutoConfig, AutoModel, PretrainedConfig

MODEL_TYPE = "srdrl_vla"
HUB_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision",
                 "subfolder", "token", "trust_remote_code", "code_revision", "adapter_kwargs",
                 "_from_auto", "_commit_hash")
"""What ``AutoModel.from_pretrained`` passes on for hub downloads; srdrl reads local folders
only, so these change nothing."""


def _policy_fields() -> tuple[str, ...]:
    from srdrl.policy.config import PolicyConfig

    return tuple(f.name for f in dataclasses.fields(PolicyConfig))


class SRDRLConfig(PretrainedConfig):
    """``config.json`` of srdrl's checkpoint layout (see the module docstring)."""

    model_type = MODEL_TYPE

    def __init__(self, vlm_config: dict | None = None, **kwargs):
        policy = {name: kwargs.pop(name) for name in _policy_fields() if name in kwargs}
        super().__init__(**kwargs)
        for name, value in policy.items():
            setattr(self, name, value)
        self.vlm_config = vlm_config

    @classmethod
    def from_policy(cls, config, vlm_config: dict | None = None) -> SRDRLConfig:
        """From a ``PolicyConfig`` and the VLM's config as a dict."""
        return cls(vlm_config=vlm_config, architectures=["VLAPolicy"], **config.to_dict())

    def to_policy_config(self):
        """The ``PolicyConfig`` (fields this file lacks take their defaults)."""
        from srdrl.policy.config import PolicyConfig

        return PolicyConfig(**{name: getattr(self, name) for name in _policy_fields()
                               if hasattr(self, name)})


class AutoVLAPolicy:
    """What ``AutoModel`` resolves 'srdrl_vla' to: builds a ``VLAPolicy``."""

    config_class = SRDRLConfig

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        if args:
            raise TypeError(f"VLAPolicy.from_pretrained takes no positional arguments after the "
                            f"path, got {args}")
        from srdrl.policy.model import VLAPolicy

        kwargs = {k: v for k, v in kwargs.items() if k not in HUB_ARGUMENTS}
        return VLAPolicy.from_pretrained(path, **kwargs)

    @classmethod
    def _from_config(cls, config: SRDRLConfig, **kwargs):
        """``AutoModel.from_config``: a fresh policy (random weights, trained tokenizer)."""
        from transformers import Qwen3VLConfig

        from srdrl.policy.model import VLAPolicy

        vlm = Qwen3VLConfig.from_dict(config.vlm_config) if config.vlm_config else None
        return VLAPolicy(config.to_policy_config(), vlm_config=vlm, **kwargs)


def register_auto_classes() -> None:
    """Let ``AutoConfig``/``AutoModel`` load srdrl's own checkpoint folders."""
    AutoConfig.register(MODEL_TYPE, SRDRLConfig, exist_ok=True)
    AutoModel.register(SRDRLConfig, AutoVLAPolicy, exist_ok=True)


def push_to_hub(policy, repo_id: str, layout: str | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload srdrl policy",
                max_shard_size: int | str = "5GB") -> str:
    """Save ``policy`` (in ``layout``, default the one it was loaded from) to a temporary
    folder and upload it to ``repo_id`` (created if missing). Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        policy.save_pretrained(folder, layout=layout, max_shard_size=max_shard_size)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder,
                                   commit_message=commit_message)
    return str(commit)
