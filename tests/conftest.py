import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from checkpoints import build_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Builds (once per session) a random-weight checkpoint of an architecture."""
    cache: dict = {}

    def make(arch: str):
        if arch not in cache:
            folder = str(tmp_path_factory.mktemp(f"ckpt-{arch}"))
            cache[arch] = (folder, build_checkpoint(arch, folder))
        return cache[arch]

    return make
