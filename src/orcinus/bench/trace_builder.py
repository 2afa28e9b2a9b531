"""Builds a trace from the command line's dataset flags, the same way for every bench command.

The model (or `--tokenizer`) is read only for what a trace needs: the vocabulary size and the
special token ids for random prompts, and the tokenizer for ShareGPT's real text.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass

from orcinus.bench.workloads import (ORCA_OUTPUT_LEN, ORCA_PROMPT_LEN, RANDOM_NUM_REQUESTS, RANDOM_OUTPUT_LEN,
                                     RANDOM_PROMPT_LEN, BenchRequest, LengthRange, TokenSampler, random_trace,
                                     special_token_ids)

logger = logging.getLogger(__name__)

DATASETS = ("random", "orca", "sharegpt")


@dataclass
class TraceSpec:
    dataset: str = "random"
    num_requests: int | None = None  # None: the dataset's habit (256 random, 64 orca/sharegpt)
    prompt_len: LengthRange | None = None  # random only; None: the dataset's habit
    output_len: LengthRange | None = None
    seed: int = 0
    shared_prefix_len: int = 0  # random/orca: tokens every prompt starts with (a shared system prompt)

    def describe(self) -> dict:
        return {"dataset": self.dataset, "num_requests": self.resolved_num_requests(),
                "prompt_len": str(self.prompt_len) if self.prompt_len else None,
                "output_len": str(self.output_len) if self.output_len else None, "seed": self.seed,
                "shared_prefix_len": self.shared_prefix_len}

    def resolved_num_requests(self) -> int:
        if self.num_requests is not None:
            return self.num_requests
        return RANDOM_NUM_REQUESTS if self.dataset == "random" else 64


def add_trace_args(parser: argparse.ArgumentParser, default_dataset: str = "random", with_seed: bool = True) -> None:
    """Workload flags. with_seed=False where the engine flags already define --seed: one seed then
    draws the trace and seeds the engine (greedy decoding does not use it)."""
    g = parser.add_argument_group("workload")
    g.add_argument("--dataset", choices=DATASETS, default=default_dataset,
                   help="random: uniform lengths (--prompt-len/--output-len); orca: the paper's trace, prompts "
                        "U(32,512), outputs U(1,128); sharegpt: real conversation lengths")
    g.add_argument("--num-requests", type=int, default=None,
                   help=f"default {RANDOM_NUM_REQUESTS} for random, 64 otherwise")
    g.add_argument("--prompt-len", type=LengthRange.parse, default=None,
                   help=f"LO:HI prompt tokens, uniform (random; default {RANDOM_PROMPT_LEN}, orca {ORCA_PROMPT_LEN})")
    g.add_argument("--output-len", type=LengthRange.parse, default=None,
                   help=f"LO:HI output tokens, uniform, EOS ignored (default {RANDOM_OUTPUT_LEN}, "
                        f"orca {ORCA_OUTPUT_LEN})")
    g.add_argument("--shared-prefix-len", type=int, default=0, metavar="N",
                   help="random/orca: every prompt starts with the same N random tokens (a shared system "
                        "prompt, for prefix caching), followed by its own --prompt-len tokens (default 0)")
    if with_seed:
        g.add_argument("--seed", type=int, default=0, help="trace and arrival seed")


def trace_spec_from_args(args: argparse.Namespace) -> TraceSpec:
    return TraceSpec(args.dataset, args.num_requests, args.prompt_len, args.output_len, args.seed,
                     args.shared_prefix_len)


def read_model_config(model: str | None):
    """orcinus' ModelConfig of a checkpoint folder or GGUF file, without loading any weight."""
    from orcinus.models.loader import resolve_model_path
    from orcinus.models.registry import resolve

    path = resolve_model_path(model)
    if path.endswith(".gguf") and os.path.isfile(path):
        from orcinus.models.gguf_loader import read_gguf

        hf_config, _weights = read_gguf(path)  # the weights are a lazy iterator: nothing is read
    else:
        with open(os.path.join(path, "config.json")) as f:
            hf_config = json.load(f)
    return resolve(hf_config).parse_config(hf_config)


def load_tokenizer(model: str | None):
    """orcinus' tokenizer for the model, or None when the checkpoint has none."""
    from orcinus.models.loader import resolve_model_path

    try:
        from orcinus.tokenizer import Tokenizer

        return Tokenizer.from_model_path(resolve_model_path(model))
    except Exception as exc:  # random traces work without one; ShareGPT says so itself
        logger.warning("no tokenizer for %s (%s): random prompts may include special tokens", model, exc)
        return None


def build_trace(spec: TraceSpec, model: str | None) -> list[BenchRequest]:
    """The trace of `spec` for `model`'s vocabulary (all requests at offset 0)."""
    n = spec.resolved_num_requests()
    if spec.shared_prefix_len < 0:
        raise ValueError(f"--shared-prefix-len must be 0 or more, got {spec.shared_prefix_len}")
    if spec.shared_prefix_len and spec.dataset == "sharegpt":
        # ShareGPT prompts are real text: random prefix tokens would not survive a text round trip
        raise ValueError("--shared-prefix-len works with --dataset random or orca, not sharegpt")
    tokenizer = load_tokenizer(model)
    if spec.dataset == "sharegpt":
        from orcinus.bench.sharegpt import sharegpt_trace

        if tokenizer is None:
            raise ValueError("the sharegpt dataset needs the model's tokenizer to count tokens")
        return sharegpt_trace(n, tokenizer.encode, spec.seed,
                              encode_output=lambda text: tokenizer.encode(text, add_special_tokens=False))
    vocab = read_model_config(model).vocab_size
    if tokenizer is not None:
        # The tokenizer may know fewer ids than the embedding has rows (padded vocabularies).
        vocab = min(vocab, tokenizer.vocab_size)
    sampler = TokenSampler(vocab, special_token_ids(tokenizer))
    if spec.dataset == "orca":
        prompt_len = spec.prompt_len or ORCA_PROMPT_LEN
        output_len = spec.output_len or ORCA_OUTPUT_LEN
    else:
        prompt_len = spec.prompt_len or RANDOM_PROMPT_LEN
        output_len = spec.output_len or RANDOM_OUTPUT_LEN
    return random_trace(n, prompt_len, output_len, sampler, spec.seed, spec.shared_prefix_len)
