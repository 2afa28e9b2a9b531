"""Periodic throughput and queue lines for an operator tailing the log; silent while idle."""
from __future__ import annotations

import asyncio
import logging
import time

from orcinus.engine.async_engine import AsyncEngine

logger = logging.getLogger("orcinus.stats")


async def log_stats_forever(engine: AsyncEngine, interval_s: float) -> None:
    last = engine.stats()
    last_t = time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        now, s = time.monotonic(), engine.stats()
        dt = max(now - last_t, 1e-9)
        prompt_tps = (s.prompt_tokens_total - last.prompt_tokens_total) / dt
        gen_tps = (s.generation_tokens_total - last.generation_tokens_total) / dt
        its = (s.iterations_total - last.iterations_total) / dt
        waiting = engine.num_waiting()
        if its or s.num_running or waiting:
            logger.info("throughput: prompt %.1f tok/s, generation %.1f tok/s, %.1f iterations/s | "
                        "running %d, waiting %d | KV cache %.1f%% used", prompt_tps, gen_tps, its,
                        s.num_running, waiting, 100 * s.kv_cache_usage)
        health = engine.health()
        if not health.ok:
            logger.warning("engine unhealthy: %s", health.reason)
        last, last_t = s, now
