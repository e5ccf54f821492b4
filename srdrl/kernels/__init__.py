"""GPU kernels of srdrl, installed as ``srdrl.kernels``.

Path safety: ``path_safety`` (validation and dispatch) over the backends
``path_safety_triton``, ``path_safety_kornia`` and ``reference`` (the OpenCV oracle), which
share ``path_safety_common`` (result type, constants, reference region).
"""

from .path_safety import path_safety
from .path_safety_common import PathSafety

__all__ = ["PathSafety", "path_safety"]
