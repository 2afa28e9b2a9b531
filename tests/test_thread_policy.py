"""cpu_thread_policy: parsed, put into the environment before torch loads, a user's own wins."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orcinus import thread_policy as tp
from orcinus.config import ConfigError, EngineConfig

SRC = os.path.dirname(os.path.dirname(os.path.abspath(tp.__file__)))

# Records the OpenMP variables at the moment torch is imported, then lets the import go on.
HOOK = """
import json, os, sys
_REC = sys.argv[-1]
class _Rec:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not os.path.exists(_REC):
            with open(_REC, "w") as f:
                json.dump({k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}, f)
        return None
sys.meta_path.insert(0, _Rec())
"""


def test_policies_parse_and_bad_ones_say_what_to_write() -> None:
    assert tp.check("spin:0100") == "spin:100"
    assert tp.resolve("auto") == tp.AUTO
    assert tp.env_for("passive") == {"OMP_WAIT_POLICY": "passive"}
    assert tp.env_for("spin:5000") == {"GOMP_SPINCOUNT": "5000"}
    assert tp.env_for("spin") == {}
    for bad in ("busy", "spin:", "spin:-1", "spin:x"):
        with pytest.raises(tp.ThreadPolicyError, match="choose auto, spin, passive or spin:N"):
            tp.check(bad)
    with pytest.raises(ConfigError, match="cpu_thread_policy"):
        EngineConfig(cpu_thread_policy="fast")


def test_apply_sets_replaces_and_leaves_a_users_own_alone() -> None:
    env: dict[str, str] = {}
    got = tp.apply(None, env, loaded=False)
    assert got.source == "orcinus" and env["GOMP_SPINCOUNT"] == "10000" and tp.AUTO == "spin:10000"
    assert "thread governor" in got.describe()
    # a later call (the CLI flag) replaces what orcinus set itself
    got = tp.apply("passive", env, loaded=False)
    assert "GOMP_SPINCOUNT" not in env and env["OMP_WAIT_POLICY"] == "passive" and got.effective == "passive"
    got = tp.apply("spin:2000", env, loaded=False)
    assert "OMP_WAIT_POLICY" not in env and env["GOMP_SPINCOUNT"] == "2000" and got.effective == "spin:2000"
    got = tp.apply("spin", env, loaded=False)
    assert not any(k in env for k in tp.OPENMP_VARS) and "spin" in got.describe()
    # the user's own setting wins, and the description says so
    env = {"OMP_WAIT_POLICY": "active"}
    got = tp.apply("passive", env, loaded=False)
    assert env == {"OMP_WAIT_POLICY": "active"} and got.source == "user environment"
    assert "your environment's OMP_WAIT_POLICY=active" in got.describe()
    # too late: libgomp already read its settings
    env = {}
    got = tp.apply("passive", env, loaded=True)
    assert env == {} and "NOT applied" in got.describe() and "ORCINUS_CPU_THREAD_POLICY=passive" in got.describe()


def test_policy_from_argv() -> None:
    assert tp.policy_from_argv(["serve", "--cpu-thread-policy", "spin"]) == "spin"
    assert tp.policy_from_argv(["serve", "--cpu-thread-policy=spin:10"]) == "spin:10"
    assert tp.policy_from_argv(["serve"]) is None


def _env_at_torch_import(tmp_path, code: str, env_extra: dict[str, str], argv: list[str] = ()) -> dict:
    rec = str(tmp_path / f"rec{len(os.listdir(tmp_path))}.json")
    env = {k: v for k, v in os.environ.items() if k not in tp.OPENMP_VARS + (tp.ENV_POLICY, tp.ENV_MARKER)}
    env |= {"PYTHONPATH": SRC} | env_extra
    subprocess.run([sys.executable, "-c", HOOK + code, *argv, rec], env=env, check=True, timeout=300,
                   capture_output=True)
    with open(rec) as f:
        return json.load(f)


def test_the_policy_is_in_the_environment_before_torch_is_imported(tmp_path) -> None:
    code = "import orcinus\nfrom orcinus import LLM\n"
    assert _env_at_torch_import(tmp_path, code, {}) == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000"}
    assert _env_at_torch_import(tmp_path, code, {"ORCINUS_CPU_THREAD_POLICY": "spin"}) == \
        {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}
    # a user's own variables win over the default and over a policy asked for
    assert _env_at_torch_import(tmp_path, code, {"OMP_WAIT_POLICY": "active"}) == \
        {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": None}
    assert _env_at_torch_import(tmp_path, code, {"GOMP_SPINCOUNT": "77", "ORCINUS_CPU_THREAD_POLICY": "passive"}) == \
        {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "77"}


def test_the_cli_flag_is_applied_before_torch_is_imported(tmp_path) -> None:
    # The console script and `python -m orcinus` both import orcinus.cli before torch.
    code = ("import runpy, sys\nsys.argv = ['orcinus', 'generate', '--cpu-thread-policy', 'spin:5000', '--help']\n"
            "try:\n    runpy.run_module('orcinus', run_name='__main__')\nexcept SystemExit:\n    pass\n")
    assert _env_at_torch_import(tmp_path, code, {}) == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "5000"}
    assert _env_at_torch_import(tmp_path, code, {"OMP_WAIT_POLICY": "active"}) == \
        {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": None}


def test_a_bad_environment_value_does_not_break_the_import(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in tp.OPENMP_VARS} | {"PYTHONPATH": SRC,
                                                                             tp.ENV_POLICY: "fastest"}
    out = subprocess.run([sys.executable, "-c", "import os, orcinus; print(os.environ.get('GOMP_SPINCOUNT'))"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "10000" and "fastest" in out.stderr
