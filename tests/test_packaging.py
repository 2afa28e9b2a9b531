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


def test_the_wheel_carries_the_c_decode_kernel(tmp_path) -> None:
    """A non-editable install must still find `paged_decode.c` to compile at first use."""
    import zipfile

    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("orcinus-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "orcinus/attention/paged_decode.c" in names and "orcinus/py.typed" in names
