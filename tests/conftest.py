"""Test setup shared by all test modules.

Without a GPU, Triton kernels run through Triton's interpreter. Triton reads
``TRITON_INTERPRET`` when a ``@triton.jit`` function is defined, so it must be set here,
before any test module imports a kernel module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A small generated training set (14 scenes of 128x96, half the labels noisy) that the
    trainer tests run on; test modules with other needs define their own ``data``."""
    from srdrl.data.synthetic import SyntheticDataConfig, make_dataset  # after TRITON_INTERPRET

    root = tmp_path_factory.mktemp("train_data")
    make_dataset(SyntheticDataConfig(output_dir=str(root), num_scenes=14, width=128, height=96,
                                     seed=4, label_noise=0.5), progress=False)
    return root / "train.jsonl"
