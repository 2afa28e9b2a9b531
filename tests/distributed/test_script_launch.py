"""A user script that builds `LLM(..., tensor_parallel_size=2)` at top level, without an
`if __name__ == "__main__":` guard, runs once: the spawned workers do not re-run the script."""
from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
from orcinus import LLM, SamplingParams
llm = LLM({folder!r}, tensor_parallel_size=2, kv_cache_memory=1 << 22)
out = llm.generate({{"prompt_token_ids": [5, 6, 7]}}, SamplingParams(max_tokens=3, temperature=0.0))
print("TOKENS", out[0].outputs[0].token_ids)
"""


def test_unguarded_script_runs_once(checkpoint_factory, tmp_path):
    folder, _ = checkpoint_factory("llama")
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT.format(folder=folder))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TOKENS")]
    assert len(lines) == 1 and len(lines[0].split(",")) == 3, proc.stdout
