"""The transformers baselines of `bench offline`: the same weights run by Hugging Face code.

- `hf`: `model.generate` in static batches of max_num_seqs requests, left-padded, each batch run
  for the longest output in it (min_new_tokens = max_new_tokens, so EOS cannot end it early).
  Only each request's own requested tokens count as output: the tokens generated for requests
  that are already done are the waste request-level batching pays, as in the paper's baseline.
- `hf-cb`: transformers' continuous batching, the machinery behind `model.generate_batch`, used
  through its manager so each request gets its own max_new_tokens (`generate_batch` takes one
  for all); EOS is disabled (eos_token_id=-1) as `ignore_eos` does in orcinus.

GGUF files are loaded with orcinus' own reader into a transformers model built from the same
config: transformers' `gguf_file=` path needs `accelerate`, which is not a dependency, and this
way both systems multiply by bit-identical dequantised weights.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from orcinus.bench.workloads import BenchRequest


def load_hf_model(model: str | None, dtype: torch.dtype, device: torch.device):
    """A transformers causal LM with the weights orcinus would load for `model`."""
    import transformers as tf

    from orcinus.models.loader import resolve_model_path

    path = resolve_model_path(model)
    if path.endswith(".gguf") and os.path.isfile(path):
        from orcinus.models.gguf_loader import read_gguf

        hf_config, weights = read_gguf(path)
        cfg_kwargs = dict(hf_config)
        model_type = cfg_kwargs.pop("model_type")
        cfg_kwargs.pop("architectures", None)
        config = tf.AutoConfig.for_model(model_type, **cfg_kwargs)
        hf = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = hf.load_state_dict(dict(weights), strict=False)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        really_missing = [m for m in missing if not (tied and m == "lm_head.weight")]
        if really_missing or unexpected:
            raise RuntimeError(f"GGUF weights do not fit transformers' {type(hf).__name__}: "
                               f"missing {really_missing[:5]}, unexpected {unexpected[:5]}")
        if tied:
            hf.tie_weights()
    else:
        hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return hf.to(device).eval()


def _pad_id(hf) -> int:
    cfg = hf.generation_config
    for candidate in (cfg.pad_token_id, cfg.eos_token_id, hf.config.eos_token_id, 0):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


@torch.inference_mode()
def run_hf_static(hf, trace: Sequence[BenchRequest], batch_size: int, progress: bool = True) -> int:
    """Runs the trace in arrival-order batches; returns the useful (requested) output tokens."""
    from tqdm.auto import tqdm

    device = hf.device
    pad = _pad_id(hf)
    useful = 0
    batches = [trace[i:i + batch_size] for i in range(0, len(trace), batch_size)]
    for batch in tqdm(batches, desc="hf generate", unit="batch", disable=not progress, dynamic_ncols=True):
        width = max(r.prompt_len for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[row, width - r.prompt_len:] = torch.tensor(r.prompt_token_ids)
            mask[row, width - r.prompt_len:] = 1
        longest = max(r.output_len for r in batch)
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                          min_new_tokens=longest, do_sample=False, pad_token_id=pad)
        if out.shape[1] - width != longest:
            raise RuntimeError(f"generate returned {out.shape[1] - width} new tokens, expected {longest}")
        useful += sum(r.output_len for r in batch)
    return useful


def _cb_config(max_num_seqs: int, num_blocks: int, block_tokens: int):
    """transformers' ContinuousBatchingConfig with the cache's tokens per block named as this
    version names it: `block_size` in the first 5.x releases, `page_size` in later ones (5.25 takes
    both). Read from the signature at run time, not guessed from a version number."""
    import inspect

    from transformers import ContinuousBatchingConfig

    params = inspect.signature(ContinuousBatchingConfig).parameters
    name = "page_size" if "page_size" in params else "block_size" if "block_size" in params else None
    if name is None:
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__}'s ContinuousBatchingConfig takes neither "
                           "page_size nor block_size; update orcinus/bench/hf_baselines.py")
    return ContinuousBatchingConfig(max_requests_per_batch=max_num_seqs, num_blocks=num_blocks,
                                    **{name: block_tokens})


def continuous_batching_available(hf) -> tuple[bool, str]:
    """transformers' continuous batching as used here (the manager with a ContinuousBatchingConfig)
    came with transformers 5; 4.x releases before it have neither."""
    if not hasattr(hf, "generate_batch") or not hasattr(hf, "continuous_batching_context_manager"):
        import transformers

        return False, f"transformers {transformers.__version__} has no generate_batch"
    try:
        from transformers import ContinuousBatchingConfig  # noqa: F401
    except ImportError:
        import transformers

        return False, f"transformers {transformers.__version__} has no ContinuousBatchingConfig"
    return True, ""


@torch.inference_mode()
def run_hf_continuous(hf, trace: Sequence[BenchRequest], max_num_seqs: int, progress: bool = True,
                      page_size: int = 256) -> int:
    """Runs the trace through transformers' continuous batching; returns the generated tokens."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    longest = max(r.prompt_len + r.output_len for r in trace)
    # Size the paged cache for max_num_seqs of the longest request, as orcinus' reservations
    # would need: left to itself it takes 60% of host memory on CPU, and its attention mask
    # grows with the whole cache.
    blocks = max_num_seqs * (math.ceil(longest / page_size) + 1)
    cb = _cb_config(max_num_seqs, blocks, page_size)
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(r.output_len for r in trace))
    results = {}
    bar = tqdm(total=len(trace), desc="hf continuous batching", unit="req", disable=not progress,
               dynamic_ncols=True)
    with hf.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                block=True, timeout=30, warmup=False) as manager:
        ids = [manager.add_request(list(r.prompt_token_ids), max_new_tokens=r.output_len, eos_token_id=-1)
               for r in trace]
        while len(results) < len(ids):
            res = manager.get_result(timeout=1)
            if res is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped early")
                continue
            if res.is_finished():
                if res.error is not None:
                    raise RuntimeError(f"transformers' continuous batching failed a request: {res.error}")
                results[res.request_id] = res
                bar.update(1)
    bar.close()
    generated = 0
    for rid, r in zip(ids, trace):
        n = len(results[rid].generated_tokens)
        if n != r.output_len:
            raise RuntimeError(f"continuous batching generated {n} tokens for a request asking {r.output_len}")
        generated += n
    return generated

