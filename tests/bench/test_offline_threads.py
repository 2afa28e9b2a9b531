"""`bench offline` runs each backend on a thread that ends with it, and joins the engine's forward
thread before the next backend starts, so that no OpenMP thread team of one backend is left
running beside the next (orcinus/bench/own_thread.py, `on_own_thread`)."""
from __future__ import annotations

import threading

import pytest

from orcinus.bench import offline
from orcinus.bench.own_thread import on_own_thread
from orcinus.cli import main


def alive(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


def test_each_backend_runs_on_its_own_thread_and_leaves_none(checkpoint_factory, monkeypatch, tmp_path):
    folder, _ = checkpoint_factory("llama")
    ran_on: dict[str, threading.Thread] = {}
    forwards_after: dict[str, list] = {}
    for name in ("run_orcinus", "run_transformers"):
        original = getattr(offline, name)

        def wrapped(config, backend, *args, _original=original, **kwargs):
            ran_on[backend] = threading.current_thread()
            try:
                return _original(config, backend, *args, **kwargs)
            finally:
                forwards_after[backend] = alive("orcinus-forward")

        monkeypatch.setattr(offline, name, wrapped)
    before = set(alive("orcinus-forward"))
    argv = ["bench", "offline", "--model", folder, "--num-requests", "3", "--prompt-len", "4:8", "--output-len",
            "2:3", "--backends", "orca,hf,paged", "--no-floor", "--no-progress", "--dtype", "float32",
            "--output-json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    assert set(ran_on) == {"orca", "hf", "paged"}
    threads = list(ran_on.values())
    assert threading.main_thread() not in threads and len(set(threads)) == 3
    assert not any(t.is_alive() for t in threads)
    # an orcinus backend has joined its forward thread before it returns
    assert set(forwards_after["orca"]) <= before and set(forwards_after["paged"]) <= before


def test_own_thread_returns_and_raises_like_a_call():
    assert on_own_thread(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ValueError, match="broken"):
        on_own_thread(lambda: (_ for _ in ()).throw(ValueError("broken")))
