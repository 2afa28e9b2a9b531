"""Run this node's share of the ranks when an engine spans several machines.

On the first node, the engine (`orcinus serve ... --nnodes 2`, or `LLM(..., nnodes=2)`) runs
ranks 0 .. world/nnodes - 1 itself; on node K run, with the same engine flags and the same
MASTER_ADDR / MASTER_PORT (the first node's address and a free port):

    MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 python -m orcinus.distributed.launch --node-rank 1 \
        --nnodes 2 --tensor-parallel-size 2 --model /models/llama

It exits when the engine shuts down (0) or a rank fails (non-zero).
"""
from __future__ import annotations

import argparse
import logging
import sys

from orcinus.engine.arg_utils import add_engine_args, engine_config_from_args
from orcinus.errors import ConfigError
from orcinus.executor.worker_process import RankInfo
from orcinus.executor.multiproc import master_from_env, spawn_worker


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(prog="python -m orcinus.distributed.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--node-rank", type=int, required=True, help="this node's index, 1 .. nnodes - 1")
    add_engine_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = engine_config_from_args(args)
    if not 1 <= args.node_rank < config.nnodes:
        raise ConfigError(f"--node-rank must be in 1 .. {config.nnodes - 1} (node 0 runs the engine); "
                          f"got {args.node_rank}")
    addr, port = master_from_env()
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    per_node = tp * pp // config.nnodes
    ctx = mp.get_context("spawn")
    procs = [spawn_worker(ctx, RankInfo(rank, tp, pp, addr, port, config.distributed_timeout_s, networked=True),
                          config)
             for rank in range(args.node_rank * per_node, (args.node_rank + 1) * per_node)]
    for proc in procs:
        proc.join()
    return max((abs(p.exitcode or 0) for p in procs), default=0)


if __name__ == "__main__":
    sys.exit(main())
