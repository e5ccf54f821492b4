"""Test setup shared by all test modules.

Without a GPU, Triton kernels run through Triton's interpreter. Triton reads
``TRITON_INTERPRET`` when a ``@triton.jit`` function is defined, so it must be set here,
before any test module imports a kernel module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
