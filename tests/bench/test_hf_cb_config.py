"""transformers' continuous-batching config names the cache's tokens per block `block_size` in
its first 5.x releases and `page_size` later: the baseline reads the signature at run time."""
from __future__ import annotations

import pytest

from orcinus.bench.hf_baselines import _cb_config


class _Early:  # as transformers 5.0-5.2x
    def __init__(self, max_requests_per_batch=None, num_blocks=None, block_size=256):
        self.kwargs = dict(max_requests_per_batch=max_requests_per_batch, num_blocks=num_blocks, block_size=block_size)


class _Later:  # as transformers 5.25
    def __init__(self, page_size=256, num_blocks=None, max_requests_per_batch=None):
        self.kwargs = dict(max_requests_per_batch=max_requests_per_batch, num_blocks=num_blocks, page_size=page_size)


class _Neither:
    def __init__(self, max_requests_per_batch=None, num_blocks=None):
        pass


@pytest.mark.parametrize("cls, name", [(_Early, "block_size"), (_Later, "page_size")])
def test_the_block_size_goes_by_the_name_the_installed_version_takes(cls, name, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "ContinuousBatchingConfig", cls, raising=False)
    cfg = _cb_config(8, 40, 64)
    assert cfg.kwargs == {"max_requests_per_batch": 8, "num_blocks": 40, name: 64}


def test_a_version_with_neither_name_says_what_to_update(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "ContinuousBatchingConfig", _Neither, raising=False)
    with pytest.raises(RuntimeError, match="neither page_size nor block_size"):
        _cb_config(8, 40, 64)


def test_the_installed_transformers_takes_one_of_them():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "ContinuousBatchingConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no continuous batching")
    cfg = _cb_config(4, 10, 32)
    assert getattr(cfg, "page_size", None) == 32 or getattr(cfg, "block_size", None) == 32
