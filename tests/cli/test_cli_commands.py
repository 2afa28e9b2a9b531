"""The command line, run as a user would: a real subprocess on the default model."""
from __future__ import annotations

import subprocess
import sys


def _run(args: list[str], stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orcinus", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_generate_answers_on_the_default_model():
    res = _run(["generate", "--prompt", "What is the capital of France?", "--max-tokens", "24"])
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_chat_streams_a_reply_from_stdin():
    res = _run(["chat", "--max-tokens", "24"], stdin="What is the capital of France?\n/exit\n")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_missing_model_is_a_clear_error_not_a_traceback(tmp_path):
    res = _run(["generate", "--model", str(tmp_path / "absent"), "--prompt", "hi"])
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_bad_engine_setting_is_a_clear_error():
    res = _run(["generate", "--scheduler-policy", "orca", "--max-num-seqs", "0", "--prompt", "hi"])
    assert res.returncode == 2
    assert "max_num_seqs" in res.stderr and "Traceback" not in res.stderr
