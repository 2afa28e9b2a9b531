"""Packaging: the src layout keeps a clone of the repository named `orcinus/` in the working
directory from shadowing the installed package (it used to import as an empty namespace package),
and the type-hint marker ships with the package."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orcinus

ROOT = Path(__file__).resolve().parent.parent


def test_a_clone_named_orcinus_in_the_working_directory_does_not_shadow_the_package(tmp_path) -> None:
    (tmp_path / "orcinus").symlink_to(ROOT, target_is_directory=True)  # `git clone ... orcinus`
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user's shell has it
    res = subprocess.run([sys.executable, "-c", "import orcinus; print(orcinus.__file__); print(orcinus.LLM)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    first = res.stdout.splitlines()[0]
    assert first.endswith(os.path.join("orcinus", "__init__.py")), first


def test_the_package_is_typed() -> None:
    assert (Path(orcinus.__file__).parent / "py.typed").is_file()


def test_the_wheel_carries_the_c_kernels(tmp_path) -> None:
    """A non-editable install must still find the C kernels and the headers they include to compile
    at first use."""
    import zipfile

    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("orcinus-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "orcinus/attention/paged_attention.c" in names and "orcinus/py.typed" in names
    assert "orcinus/layers/quant_kernels.c" in names and "orcinus/layers/quant_tiles.h" in names
    assert "orcinus/attention/paged_prefill.h" in names and "orcinus/csrc/float_formats.h" in names


def test_the_benchmark_dependencies_are_an_extra_the_product_never_imports() -> None:
    import argparse

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from orcinus.cli import BENCH_EXTRA, user_error_message

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert set(project["optional-dependencies"]["bench"]) == set(BENCH_EXTRA)
    assert set(BENCH_EXTRA) <= set(project["optional-dependencies"]["test"])  # CI still runs the bench tests
    assert not {d.split(">")[0].split("=")[0] for d in project["dependencies"]} & set(BENCH_EXTRA)
    # the engine, the offline API, the server and the CLI start without them
    probe = ("import sys, orcinus, orcinus.cli, orcinus.server.app, orcinus.engine.async_engine; "
             "print(sorted(m for m in ('httpx', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # and `orcinus bench` without them says what to install
    message = user_error_message(ModuleNotFoundError("No module named 'httpx'", name="httpx"), argparse.Namespace())
    assert message is not None and "orcinus[bench]" in message
