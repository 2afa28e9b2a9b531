"""Settings a user gets wrong end in one line and exit status 2, not "internal error ... please
report it" (issue 19, finding 5): an unknown device, a KV budget beyond the machine, a context
longer than the model's, a config.json lacking a field."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _orcinus(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, "-m", "orcinus", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def _assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "internal error" not in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]


@pytest.fixture(scope="module")
def tiny(checkpoint_factory) -> str:
    return checkpoint_factory("llama")[0]


@pytest.mark.parametrize("case", ["device", "kv", "context"])
def test_settings_beyond_what_exists_are_user_errors(tiny: str, case: str) -> None:
    flags = {"device": ["--device", "tpu"], "kv": ["--kv-cache-memory", "1000000000000000"],
             "context": ["--max-model-len", "1000000000"]}[case]
    proc = _orcinus("generate", "--model", tiny, "--skip-tokenizer-init", "--prompt", "hi", *flags)
    words = {"device": ["device='tpu'", "cpu"], "kv": ["kv_cache_memory=1000000000000000", "GiB"],
             "context": ["max_model_len=1000000000", "512"]}[case]
    _assert_user_error(proc, *words)


def test_a_config_missing_a_field_names_it(tiny: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(tiny).iterdir():
        (broken / f.name).symlink_to(f)
    config = json.loads((Path(tiny) / "config.json").read_text())
    del config["num_attention_heads"]
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps(config))
    proc = _orcinus("generate", "--model", str(broken), "--skip-tokenizer-init", "--prompt", "hi")
    _assert_user_error(proc, "lacks the field 'num_attention_heads'", "config.json")
