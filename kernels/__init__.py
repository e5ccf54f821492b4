"""GPU kernels of srdrl, installed as ``srdrl.kernels``."""

from .path_safety import PathSafety, path_safety

__all__ = ["PathSafety", "path_safety"]
