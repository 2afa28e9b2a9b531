"""Time increment-only iterations of a 64-request batch on the default model, through a Worker
(model, attention backend, sampler; no scheduler). Run it once per source tree to compare two
trees' model code, alternating them (the machine's load moves between runs):

    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/tree/src python scripts/decode_step.py 20

Prints wall and process-CPU milliseconds per iteration; on a shared machine compare CPU time.
"""
from __future__ import annotations

import sys
import time

import torch

from orcinus.config import EngineConfig
from orcinus.executor.messages import BatchMessage, CachedRequestData, NewRequestData, SamplingSettings
from orcinus.executor.worker import Worker


def main(steps: int) -> None:
    torch.manual_seed(0)
    worker = Worker(EngineConfig(dtype="float32", device="cpu", kv_cache_memory=1 << 30, block_size=16))
    worker.initialize_kv_cache(worker.available_kv_blocks())
    greedy = SamplingSettings(temperature=0.0)
    rows, blocks = [], 0
    for i in range(64):  # prompts of 32-127 tokens, room for 40 more each
        prompt = torch.randint(10, 40000, (int(torch.randint(32, 128, (1,))),)).tolist()
        n = -(-(len(prompt) + 40) // 16)
        rows.append(NewRequestData(f"r{i}", prompt, greedy, list(range(blocks, blocks + n))))
        blocks += n
    tokens = worker.execute(BatchMessage(0, rows)).token_ids
    cpu, wall = time.process_time(), time.perf_counter()
    for seq in range(1, steps + 1):
        msg = BatchMessage(seq, [CachedRequestData(f"r{i}", t) for i, t in enumerate(tokens)])
        tokens = worker.execute(msg).token_ids
    print(f"{(time.perf_counter() - wall) / steps * 1000:.1f} ms/step wall, "
          f"{(time.process_time() - cpu) / steps * 1000:.1f} ms/step cpu")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
