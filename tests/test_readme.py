"""The README's examples, run as a user would type them: the curl requests against a real
`orcinus serve`, the offline Python snippet, the command-line examples, the parallel examples
(the two-machine pair as two processes on loopback) and the operator's requests.

The only changes made to a command are its ports (free ones instead of 8000 and 29500, so that a
test never meets another server) and, for the two-machine pair, the first machine's address
(127.0.0.1 instead of 10.0.0.1). The install commands of the quick start are not run here: they
are what made this environment."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from orcinus.bench.server_process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
# Commands run to their end however long a busy machine takes; this only catches a hang.
HANG_GUARD_S = 1500
README = (ROOT / "README.md").read_text()
MAX_ANSWER_TOKENS = 64  # "The capital of France is Paris." is 8 tokens
START_S = 240.0  # only a bound for a broken run; nothing here depends on speed


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def all_shell_commands() -> list[str]:
    """Every command of the README's bash blocks, continuation lines joined as the shell joins
    them; comment lines dropped."""
    commands = []
    for block in code_blocks("bash"):
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return commands


def shell_commands(prefix: str) -> list[str]:
    return [c for c in all_shell_commands() if c.startswith(prefix)]


def one(commands: list[str]) -> str:
    assert len(commands) == 1, commands
    return commands[0]


def curl_whole() -> str:
    return one([c for c in shell_commands("curl ") if "/v1/chat/completions" in c and not c.startswith("curl -N ")
                and "capital of France" in c])


def curl_structured(kind: str) -> str:
    return one([c for c in shell_commands("curl ") if f'"{kind}"' in c])


def curl_streaming() -> str:
    return one(shell_commands("curl -N "))


def curl_with_key() -> str:
    return one([c for c in shell_commands("curl ") if "Bearer secret" in c])


def curl_ops(path: str) -> str:
    return one([c for c in shell_commands("curl ") if c.endswith(f":8000{path}")])


def generate_plain() -> str:
    return one([c for c in shell_commands("orcinus generate ") if "parallel" not in c]).split("#")[0].strip()


def generate_parallel() -> str:
    return one([c for c in shell_commands("orcinus generate ") if "--pipeline-parallel-size" in c])


def serve_with_key() -> str:
    return one(shell_commands("orcinus serve ")).split("#")[0].strip()


def two_machines() -> tuple[str, str]:
    pair = shell_commands("MASTER_ADDR=")
    assert len(pair) == 2, pair
    first = one([c for c in pair if " orcinus serve " in c])
    second = one([c for c in pair if "orcinus.distributed.launch" in c])
    return first, second


def bench_offline() -> str:
    return one(shell_commands("orcinus bench offline "))


def commands_this_file_runs() -> set[str]:
    return {curl_whole(), curl_streaming(), curl_with_key(), curl_ops("/health"), curl_ops("/metrics"),
            one(shell_commands("orcinus generate --prompt")), generate_parallel(), one(shell_commands("orcinus chat")),
            one(shell_commands("orcinus serve ")), *two_machines(), bench_offline(),
            one(shell_commands("python -m orcinus --help")), curl_structured("response_format"),
            curl_structured("tools")}


def _env() -> dict[str, str]:
    # The `orcinus` console script and `python` of this environment come first on PATH.
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def _bash(command: str, timeout: int = HANG_GUARD_S, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=ROOT, input=stdin)


class Background:
    """A README command left running, as in a terminal of its own; its output goes to a file."""

    def __init__(self, command: str, log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(["bash", "-c", command], stdout=out, stderr=subprocess.STDOUT,
                                         env={**_env(), "PYTHONUNBUFFERED": "1"}, cwd=ROOT, start_new_session=True)

    def wait_healthy(self, port: int) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"not healthy within {START_S:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        """SIGTERM, as a supervisor or Ctrl-C would send it (bash -c runs a lone command in its own
        process, so the signal reaches orcinus itself); returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`orcinus serve` as the quick start runs it, on a free port."""
    log = tmp_path_factory.mktemp("readme") / "server.log"
    with ServerProcess(log_path=str(log), startup_timeout_s=START_S) as proc:
        yield proc, log


def _with_port(command: str, port: int) -> str:
    assert "http://127.0.0.1:8000/" in command
    return command.replace("http://127.0.0.1:8000/", f"http://127.0.0.1:{port}/")


def test_the_readme_has_the_examples_this_file_runs() -> None:
    assert len(code_blocks("python")) == 1
    assert "../shared" not in README and "(docs/design.md)" in README
    # Every command of the README is run by a test below, except the quick start's installs.
    not_run = [c for c in all_shell_commands() if c not in commands_this_file_runs()
               and not c.startswith("pip install ")]
    assert not not_run, not_run


def _chat_answer(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    choice = body["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"  # it ended by itself...
    assert body["usage"]["completion_tokens"] <= MAX_ANSWER_TOKENS  # ...after a short answer


def test_curl_chat_completion(server) -> None:
    proc, _ = server
    _chat_answer(_bash(_with_port(curl_whole(), proc.port)))


def test_curl_structured_outputs_and_tools(server) -> None:
    import jsonschema

    proc, _ = server
    res = _bash(_with_port(curl_structured("response_format"), proc.port))
    assert res.returncode == 0, res.stderr
    request = json.loads(curl_structured("response_format").split("-d '", 1)[1].rstrip("'"))
    choice = json.loads(res.stdout)["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]),
                        request["response_format"]["json_schema"]["schema"])
    res = _bash(_with_port(curl_structured("tools"), proc.port))
    assert res.returncode == 0, res.stderr
    choice = json.loads(res.stdout)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and "city" in json.loads(call["function"]["arguments"])


def test_curl_streaming_and_the_access_log_line_at_its_end(server) -> None:
    proc, log = server
    res = _bash(_with_port(curl_streaming(), proc.port))
    assert res.returncode == 0, res.stderr
    events = [line.removeprefix("data: ") for line in res.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Paris" in text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert len(chunks) <= MAX_ANSWER_TOKENS + 2
    # The access line counts every byte of the stream, so it was written after the last one.
    # curl may exit on the last byte before the server has written that line: wait for it (the
    # bound only limits a broken run).
    sent = len(res.stdout.encode())

    def lines() -> list[str]:
        return [line for line in log.read_text().splitlines() if '"POST /v1/chat/completions HTTP/1.1" 200' in line]

    deadline = time.monotonic() + 30
    while not any(f" 200 {sent}B " in line for line in lines()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(f" 200 {sent}B " in line for line in lines()), (sent, lines())


def test_health_and_the_metrics_the_readme_names(server) -> None:
    proc, _ = server
    health = _bash(_with_port(curl_ops("/health"), proc.port))
    assert health.returncode == 0 and json.loads(health.stdout)["status"] == "ok"
    metrics = _bash(_with_port(curl_ops("/metrics"), proc.port))
    assert metrics.returncode == 0, metrics.stderr
    section = README[README.index("## Serving in production"):README.index("## Models")]
    named = set(re.findall(r"`(orcinus:[a-z_]+)`", section))
    assert {"orcinus:num_preemptions", "orcinus:prefix_cache_hits"} <= named
    exposed = set(re.findall(r"^# TYPE (orcinus:[a-z_]+)", metrics.stdout, flags=re.M))
    # a counter is exposed as NAME_total, a histogram by its own name
    missing = [m for m in named if m not in exposed and m + "_total" not in exposed]
    assert not missing, (missing, sorted(exposed))


def test_offline_snippet() -> None:
    res = subprocess.run([sys.executable, "-c", code_blocks("python")[0]], capture_output=True, text=True,
                         timeout=HANG_GUARD_S, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    first, _, rest = res.stdout.partition("\n")
    assert "Paris" in first
    assert rest.strip()  # the chat reply


def test_command_line_examples_that_end_by_themselves() -> None:
    res = _bash(generate_plain())
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Paris" in res.stdout
    help_ = _bash(one(shell_commands("python -m orcinus --help")))
    assert help_.returncode == 0 and "generate" in help_.stdout and "serve" in help_.stdout


def test_chat_as_typed_answers_help_and_exits() -> None:
    res = _bash(one(shell_commands("orcinus chat")), stdin="/help\n/exit\n")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "/reset" in res.stdout and "/exit" in res.stdout


def test_bench_offline_smoke_run() -> None:
    res = _bash(bench_offline())
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| paged (") or line.startswith("| hf (")]
    assert len(rows) == 2 and all("| ok |" in row for row in rows), res.stdout


def test_pipeline_parallel_generate() -> None:
    res = _bash(generate_parallel())
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Paris" in res.stdout


def test_serve_with_an_api_key(tmp_path) -> None:
    port = free_port()
    command = serve_with_key()
    assert " --port 8000 " in command + " "
    srv = Background(command.replace("--port 8000", f"--port {port}"), tmp_path / "serve.log")
    try:
        srv.wait_healthy(port)
        res = _bash(_with_port(curl_with_key(), port))
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["data"], res.stdout  # the model list, with the key...
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # ...and refused without
        assert srv.stop() == 0
    finally:
        srv.cleanup()


def test_two_machines_as_two_processes_on_loopback(tmp_path) -> None:
    first, second = two_machines()
    http_port, master_port = free_port(), free_port()

    def local(command: str) -> str:
        for old, new in (("MASTER_ADDR=10.0.0.1", "MASTER_ADDR=127.0.0.1"),
                         ("MASTER_PORT=29500", f"MASTER_PORT={master_port}"), ("--port 8000", f"--port {http_port}")):
            command = command.replace(old, new)
        return command

    assert "MASTER_ADDR=10.0.0.1" in first and "MASTER_PORT=29500" in second and "--port 8000" in first
    machine1 = Background(local(first), tmp_path / "machine1.log")
    machine2 = Background(local(second), tmp_path / "machine2.log")
    try:
        machine1.wait_healthy(http_port)
        _chat_answer(_bash(_with_port(curl_whole(), http_port)))
        assert machine1.stop() == 0
        assert machine2.proc.wait(timeout=60) == 0, machine2.log.read_text()[-3000:]  # ends with the engine
    finally:
        machine1.cleanup()
        machine2.cleanup()
