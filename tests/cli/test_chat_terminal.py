"""`orcinus chat` in a real terminal (a pseudo-terminal): Ctrl-C typed during a reply stops it and
the prompt comes back (at the prompt it only says how to quit), the up arrow recalls the previous
line, /exit quits with status 0."""
from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

WAIT_S = 240.0  # only a bound for a broken run; nothing here depends on speed


def _take_terminal() -> None:
    """In the child: make its stdin (the pty) the controlling terminal of its new session, and let
    Ctrl-C and Ctrl-\\ act as in a shell's foreground job. A suite started in the background of a
    non-interactive shell runs with SIGINT ignored, and ignored signals survive exec: Python would
    then never raise KeyboardInterrupt in the chat."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


class Terminal:
    def __init__(self, args: list[str]) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "xterm", "PYTHONUNBUFFERED": "1"}
        env.pop("ORCINUS_DEBUG", None)
        # A session of its own with the pty as its controlling terminal, so that ^C typed on the
        # terminal becomes SIGINT for the chat, as in a shell.
        self.proc = subprocess.Popen([sys.executable, "-m", "orcinus", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, start_new_session=True, preexec_fn=_take_terminal)
        os.close(slave)
        self.seen = ""

    def read_until(self, text: str, start: int = 0) -> int:
        """Read output until `text` appears at or after `start`; returns where it ends."""
        return self._read_until(text, start, WAIT_S)

    def _read_until(self, text: str, start: int, wait_s: float) -> int:
        deadline = time.monotonic() + wait_s
        while text not in self.seen[start:]:
            assert time.monotonic() < deadline, f"never saw {text!r}; output so far:\n{self.seen[-3000:]}"
            ready, _, _ = select.select([self.master], [], [], 1.0)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    assert text in self.seen[start:], self.seen[-3000:]
        return self.seen.index(text, start) + len(text)

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait_for_line_editing(self) -> None:
        """Until readline has the terminal (canonical mode and kernel echo off): before that, a
        typed key is echoed by the terminal itself, which proves nothing about readline."""
        deadline = time.monotonic() + WAIT_S
        while termios.tcgetattr(self.master)[3] & (termios.ICANON | termios.ECHO):
            assert time.monotonic() < deadline, "readline never took the terminal"
            time.sleep(0.02)

    def interrupt_until(self, text: str, start: int) -> int:
        """Ctrl-C at readline's prompt until `text` appears. CPython's readline loses a SIGINT that
        lands between its terminal set-up or its last key and its next select(): the interrupt is
        only noticed at the next key. A person presses Ctrl-C again; so does this, after 5 s."""
        for _ in range(int(WAIT_S // 5)):
            self.type("\x03")
            try:
                return self._read_until(text, start, 5.0)
            except AssertionError:
                continue
        return self.read_until(text, start)

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


@pytest.fixture
def terminal():
    term = Terminal(["chat", "--temperature", "0", "--max-tokens", "600", "--max-model-len", "2048"])
    yield term
    if term.proc.poll() is None:
        term.proc.kill()
        term.proc.wait()


def test_ctrl_c_stops_the_reply_and_the_prompt_comes_back(terminal: Terminal) -> None:
    at = terminal.read_until("> ")
    terminal.wait_for_line_editing()
    terminal.type("x")
    at = terminal.read_until("x", at)  # echoed by readline, which is now reading keys
    # Ctrl-C at the prompt drops the line and only says how to quit
    at = terminal.interrupt_until("to quit type /exit or press Ctrl-D", at)
    at = terminal.read_until("> ", at)
    terminal.type("Write a long essay about the history of France.\r")
    at = terminal.read_until("The history", at)  # the reply (600 tokens if left alone) is under way
    terminal.type("\x03")  # Ctrl-C, as typed
    at = terminal.read_until("[interrupted]", at)
    at = terminal.read_until("> ", at)
    terminal.type("/help\r")
    at = terminal.read_until("/reset", at)
    at = terminal.read_until("> ", at)
    terminal.type("\x1b[A\r")  # the up arrow recalls /help
    at = terminal.read_until("/reset", at)
    at = terminal.read_until("> ", at)
    terminal.type("What is the capital of France?\r")
    at = terminal.read_until("Paris", at)
    at = terminal.read_until("> ", at)
    terminal.type("/exit\r")
    assert terminal.close() == 0
    assert "^[[A" not in terminal.seen and "Traceback" not in terminal.seen
