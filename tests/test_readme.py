"""The README's examples, run as a user would type them: the curl requests against a real
`orcinus serve`, the offline Python snippet, and the command-line examples that finish on their own.

The only change made to a command is the server's port (a free one instead of 8000, so that the
test never meets another server)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orcinus.bench.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MAX_ANSWER_TOKENS = 64  # "The capital of France is Paris." is 8 tokens


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def shell_commands(prefix: str) -> list[str]:
    """Commands of the README's bash blocks that start with `prefix`, continuation lines joined
    as the shell joins them, trailing comments dropped."""
    commands = []
    for block in code_blocks("bash"):
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines() if line.strip().startswith(prefix)]
    return commands


def curl_whole() -> list[str]:
    return [c for c in shell_commands("curl ") if not c.startswith("curl -N ")]


def curl_streaming() -> list[str]:
    return shell_commands("curl -N ")


def _env() -> dict[str, str]:
    # The `orcinus` console script and `python` of this environment come first on PATH.
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def _bash(command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=ROOT)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`orcinus serve` as the quick start runs it, on a free port."""
    log = tmp_path_factory.mktemp("readme") / "server.log"
    with ServerProcess(log_path=str(log), startup_timeout_s=240) as proc:
        yield proc, log


def _with_port(command: str, port: int) -> str:
    assert "http://127.0.0.1:8000/" in command
    return command.replace("http://127.0.0.1:8000/", f"http://127.0.0.1:{port}/")


def test_the_readme_has_the_examples_this_file_runs() -> None:
    assert len(curl_whole()) == 1 and len(curl_streaming()) == 1
    assert len(code_blocks("python")) == 1
    assert "../shared" not in README and "(docs/design.md)" in README


def test_curl_chat_completion(server) -> None:
    proc, _ = server
    res = _bash(_with_port(curl_whole()[0], proc.port))
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    choice = body["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"  # it ended by itself...
    assert body["usage"]["completion_tokens"] <= MAX_ANSWER_TOKENS  # ...after a short answer


def test_curl_streaming_and_the_access_log_line_at_its_end(server) -> None:
    proc, log = server
    res = _bash(_with_port(curl_streaming()[0], proc.port))
    assert res.returncode == 0, res.stderr
    events = [line.removeprefix("data: ") for line in res.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Paris" in text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert len(chunks) <= MAX_ANSWER_TOKENS + 2
    # The access line counts every byte of the stream, so it was written after the last one.
    sent = len(res.stdout.encode())
    lines = [line for line in log.read_text().splitlines() if '"POST /v1/chat/completions HTTP/1.1" 200' in line]
    assert any(f" 200 {sent}B " in line for line in lines), (sent, lines)


def test_offline_snippet() -> None:
    res = subprocess.run([sys.executable, "-c", code_blocks("python")[0]], capture_output=True, text=True,
                         timeout=300, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    first, _, rest = res.stdout.partition("\n")
    assert "Paris" in first
    assert rest.strip()  # the chat reply


def test_command_line_examples_that_end_by_themselves() -> None:
    generate = shell_commands("orcinus generate ")
    assert len(generate) == 1
    res = _bash(generate[0].split("#")[0])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Paris" in res.stdout
    help_ = _bash(shell_commands("python -m orcinus --help")[0])
    assert help_.returncode == 0 and "generate" in help_.stdout and "serve" in help_.stdout
