"""Every mistake on the command line ends with one `error:` line saying what to change and exit
status 2, never a traceback; --debug (or ORCINUS_DEBUG=1) shows the traceback instead."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from orcinus.models.loader import default_model_path


def _run(args: list[str], env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "ORCINUS_DEBUG"}
    return subprocess.run([sys.executable, "-m", "orcinus", *args], capture_output=True, text=True, timeout=1200,
                          env={**environ, **(env or {})}, input=stdin)


def assert_one_error_line(res: subprocess.CompletedProcess, *says: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-2000:]
    assert res.stderr.rstrip().splitlines()[-1] == errors[0]  # it is the last thing said
    for s in says:
        assert s in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def truncated_gguf(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corrupt") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(default_model_path(), "rb") as f:
        path.write_bytes(f.read(100_000))  # a download cut short
    return str(path)


def test_truncated_gguf(truncated_gguf: str) -> None:
    assert_one_error_line(_run(["generate", "--model", truncated_gguf, "--prompt", "hi"]),
                          truncated_gguf, "ends early or is corrupt", "download it again")


def test_not_a_gguf_at_all(tmp_path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model\n")
    assert_one_error_line(_run(["generate", "--model", str(bad), "--prompt", "hi"]), "not a GGUF file")


@pytest.mark.parametrize("flags, says", [
    (["--max-tokens", "0"], ["--max-tokens", "[1, ", "got 0"]),
    (["--temperature", "-1"], ["--temperature", "non-negative"]),
    (["--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["--max-num-seqs", "0"], ["max_num_seqs must be at least 1"]),
    (["--override-generation-config", "{temperature: 1}"], ["not valid JSON"]),
    (["--generation-config", "/nonexistent-folder"], ["no generation_config.json"]),
])
def test_bad_settings_fail_before_the_model_loads(flags: list[str], says: list[str]) -> None:
    res = _run(["generate", "--prompt", "hi", *flags])
    assert_one_error_line(res, *says)
    assert "orcinus engine:" not in res.stderr  # refused before loading anything


def test_kv_cache_too_small() -> None:
    assert_one_error_line(_run(["generate", "--prompt", "hi", "--kv-cache-memory", "1000"]),
                          "kv_cache_memory=1000", "holds no block", "raise kv_cache_memory")


def test_prompt_longer_than_the_context() -> None:
    assert_one_error_line(_run(["generate", "--prompt", "word " * 9000]),
                          "--prompt", "context length is 8192", "shorten the prompt")


def test_missing_model_and_missing_prompt(tmp_path) -> None:
    assert_one_error_line(_run(["generate", "--model", str(tmp_path / "absent"), "--prompt", "hi"]), "does not exist")
    assert_one_error_line(_run(["generate"], stdin=""), "--prompt")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how: str) -> None:
    args = ["generate", "--prompt", "hi", "--temperature", "-1"]
    res = _run(args + ["--debug"]) if how == "flag" else _run(args, env={"ORCINUS_DEBUG": "1"})
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "SamplingParamsError" in res.stderr


def test_argparse_mistakes_exit_2_too() -> None:
    res = _run(["generate", "--max-tokens", "many"])
    assert res.returncode == 2 and "invalid int value" in res.stderr and "Traceback" not in res.stderr
