"""The Alpamayo-R1 release's source, where it is on disk (``SRDRL_ALPAMAYO_SRC`` = its
``src`` folder; it is never downloaded), for the tests that compare with it."""

import importlib
import os
import sys

import pytest

RELEASE_SRC = os.environ.get("SRDRL_ALPAMAYO_SRC")


def release_module(name: str):
    """A module of the release's source tree (its ``src`` folder in SRDRL_ALPAMAYO_SRC)."""
    if RELEASE_SRC not in sys.path:
        sys.path.insert(0, RELEASE_SRC)
    return importlib.import_module(name)


needs_release = pytest.mark.skipif(not RELEASE_SRC, reason="SRDRL_ALPAMAYO_SRC not set: the "
                                   "release's source is not on disk")
