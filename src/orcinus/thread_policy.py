"""How torch's OpenMP worker threads wait between parallel regions (`cpu_thread_policy`).

torch's CPU kernels run on libgomp thread teams. Between two parallel regions libgomp's idle
workers spin (by default ~300,000 `pause` iterations, several milliseconds) before they sleep.
On a machine of its own that makes every region start at once; on a machine where anything else
runs, the spinning workers burn the time slices the thread doing the work needs, and the engine
collapses: issue 21 measured 5.4x the CPU-seconds per output token and a tenth of the speed
beside a busy process (docs/benchmarks.md, "A busy machine").

libgomp reads its settings (OMP_WAIT_POLICY, GOMP_SPINCOUNT) once, when torch loads it, so the
policy must be in the environment before `import torch`: `orcinus/__init__.py` applies it (from
ORCINUS_CPU_THREAD_POLICY) and the CLI applies `--cpu-thread-policy` before it imports anything
that loads torch. This file therefore imports no torch.

Policies:
- `auto` (default): what measured right for a quiet server and a busy laptop alike: spin:10000
  (32 % faster than passive on a quiet machine), with the engine's thread governor
  (executor/thread_governor.py) taking the team down to the free cores while other processes run.
- `spin`: libgomp's own default (the behaviour before this setting existed).
- `passive`: OMP_WAIT_POLICY=passive, idle workers sleep at once.
- `spin:N`: GOMP_SPINCOUNT=N, idle workers spin N `pause` iterations, then sleep.

A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins: orcinus then sets nothing and the
start-up line says so.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Mapping, MutableMapping, Sequence

ENV_POLICY = "ORCINUS_CPU_THREAD_POLICY"
# Names of the variables orcinus set itself (comma-separated), so that a child process, which
# inherits them, can tell them from a user's own and still apply another policy.
ENV_MARKER = "ORCINUS_CPU_THREAD_ENV"
OPENMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
NAMED = ("auto", "spin", "passive")
# What `auto` means, chosen by measurement (docs/benchmarks.md, "Issue 21 in one quiet sitting"):
# short spinning, and the engine's thread governor (executor/thread_governor.py) dropping to the
# threads left free when other processes use the cores, so that no worker spins beside them.
AUTO = "spin:10000"
FLAG = "--cpu-thread-policy"


class ThreadPolicyError(ValueError):
    """A cpu_thread_policy that does not parse; the message says what to write."""


def check(policy: str) -> str:
    """The policy, validated: auto, spin, passive or spin:N (N a whole number >= 0)."""
    if policy in NAMED:
        return policy
    if isinstance(policy, str) and policy.startswith("spin:"):
        count = policy.removeprefix("spin:")
        if count.isdigit():
            return f"spin:{int(count)}"
    raise ThreadPolicyError(f"cpu_thread_policy={policy!r} is unknown; choose auto, spin, passive or spin:N "
                            "(N: spin iterations before an idle OpenMP thread sleeps, e.g. spin:10000)")


def resolve(policy: str) -> str:
    """The concrete policy `policy` stands for (auto -> AUTO)."""
    policy = check(policy)
    return AUTO if policy == "auto" else policy


def env_for(policy: str) -> dict[str, str]:
    """The OpenMP variables a concrete policy sets (none for spin: libgomp's defaults)."""
    policy = resolve(policy)
    if policy == "passive":
        return {"OMP_WAIT_POLICY": "passive"}
    if policy.startswith("spin:"):
        return {"GOMP_SPINCOUNT": policy.removeprefix("spin:")}
    return {}


@dataclass
class Applied:
    """What the process's OpenMP runs with, and why (the start-up line)."""

    asked: str  # the policy asked for (auto, spin, ...)
    effective: str  # what OpenMP runs with: a policy name, or "your environment"
    source: str  # "orcinus" | "user environment" | "too late"
    env: dict[str, str] = field(default_factory=dict)  # the OpenMP variables in force

    def describe(self) -> str:
        shown = " ".join(f"{k}={v}" for k, v in self.env.items()) or "libgomp defaults"
        if self.source == "user environment":
            return (f"cpu_thread_policy: your environment's {shown} (set before start; it wins over "
                    f"cpu_thread_policy={self.asked})")
        if self.source == "too late":
            return (f"cpu_thread_policy: {self.asked} NOT applied: torch was imported before orcinus, so OpenMP "
                    f"runs with {shown}; set {ENV_POLICY}={self.asked} (or OMP_WAIT_POLICY) before the process "
                    "starts, or import orcinus before torch")
        how = f"{self.asked} -> {self.effective}" if self.asked != self.effective else self.effective
        if self.asked == "auto":
            how += " + thread governor (fewer threads while other processes use the cores)"
        return (f"cpu_thread_policy: {how} ({shown}; set before torch loaded; change with {FLAG} "
                f"auto|spin|passive|spin:N or {ENV_POLICY})")


_applied: Applied | None = None


def _ours(environ: Mapping[str, str]) -> set[str]:
    return {n for n in environ.get(ENV_MARKER, "").split(",") if n}


def _user_vars(environ: Mapping[str, str]) -> dict[str, str]:
    ours = _ours(environ)
    return {k: environ[k] for k in OPENMP_VARS if k in environ and k not in ours}


def openmp_loaded() -> bool:
    """Whether libgomp (through torch) is already in this process: then its settings are fixed."""
    if "torch" in sys.modules:
        return True
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


def apply(policy: str | None = None, environ: MutableMapping[str, str] | None = None,
          loaded: bool | None = None) -> Applied:
    """Put `policy`'s OpenMP variables (default: ORCINUS_CPU_THREAD_POLICY, else auto) into the
    environment, unless the user set their own or libgomp is already loaded. Idempotent; a later
    call (the CLI's flag after the import's default) replaces what an earlier one set."""
    global _applied
    env = os.environ if environ is None else environ
    asked = check(policy or env.get(ENV_POLICY) or "auto")
    user = _user_vars(env)
    if loaded if loaded is not None else openmp_loaded():
        result = Applied(asked, "unknown", "too late", {k: env[k] for k in OPENMP_VARS if k in env})
    elif user:
        result = Applied(asked, "your environment", "user environment", user)
    else:
        for name in _ours(env):
            env.pop(name, None)
        wanted = env_for(asked)
        env.update(wanted)
        if wanted:
            env[ENV_MARKER] = ",".join(sorted(wanted))
        else:
            env.pop(ENV_MARKER, None)
        env[ENV_POLICY] = asked  # worker processes started later apply the same
        result = Applied(asked, resolve(asked), "orcinus", dict(wanted))
    if environ is None:
        _applied = result
    return result


def policy_from_argv(argv: Sequence[str]) -> str | None:
    """`--cpu-thread-policy X` or `--cpu-thread-policy=X` from a command line, else None."""
    for i, arg in enumerate(argv):
        if arg == FLAG and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(FLAG + "="):
            return arg.split("=", 1)[1]
    return None


def apply_from_argv(argv: Sequence[str]) -> Applied | None:
    """The CLI's hook, run before torch loads. A bad value is left for the argument parser to
    report (with the other flags' errors)."""
    policy = policy_from_argv(argv)
    if policy is None:
        return None
    try:
        return apply(policy)
    except ThreadPolicyError:
        return None


def applied() -> Applied:
    """What this process's OpenMP runs with (applying the default now if nothing did yet)."""
    return _applied if _applied is not None else apply()


def governed(policy: str) -> bool:
    """Whether the engine's thread governor runs: `auto` asked and applied by orcinus (a user's own
    OpenMP variables, or an explicit policy, are left alone)."""
    state = applied()
    return check(policy) == "auto" and state.asked == "auto" and state.source == "orcinus"


def engine_note(policy: str) -> str:
    """The start-up line for an engine built with cpu_thread_policy=`policy`: what is in force,
    and a warning when the engine's setting came too late to be applied."""
    state = applied()
    policy = check(policy)
    if state.source == "orcinus" and policy != state.asked:
        if resolve(policy) == state.effective:
            return state.describe()
        return (f"{state.describe()}; cpu_thread_policy={policy} given to the engine cannot take effect "
                f"(OpenMP read its settings when torch loaded): set {ENV_POLICY}={policy} or pass {FLAG} "
                "on the command line")
    return state.describe()
