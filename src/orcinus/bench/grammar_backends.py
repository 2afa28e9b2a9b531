"""Grammar backends measured for structured outputs: llguidance, xgrammar, outlines-core.

For each backend, on the default model's vocabulary (SmolLM2, 49152 tokens): the time to compile
a 20-field JSON schema, the time to fill the next-token bitmask per token at batch 1 and 64 (the
matchers walk a valid JSON document token by token), and the process's RSS growth. A backend
that is not installed is reported as such. Run:

    python -m orcinus.bench.grammar_backends [--tokens 60] [--batch 64]
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Callable

import numpy as np


def schema_20_fields() -> dict:
    kinds = [{"type": "string", "maxLength": 20}, {"type": "integer", "minimum": 0, "maximum": 10**6},
             {"type": "number"}, {"type": "boolean"}, {"enum": ["red", "green", "blue"]},
             {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
             {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
              "required": ["x", "y"]}]
    props = {f"field_{i:02d}": kinds[i % len(kinds)] for i in range(20)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def sample_document() -> str:
    values = ["hello", 123, 1.5, True, "green", ["ab", "cd"], {"x": 1, "y": 2}]
    doc = {f"field_{i:02d}": values[i % len(values)] for i in range(20)}
    return json.dumps(doc, separators=(",", ":"))


def _rss_mb() -> float:
    """Current resident set size (Linux), else the peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(name: str, compile_fn: Callable[[], object], matchers_fn: Callable[[object, int], list],
             fill_fn: Callable[[list, np.ndarray], None], accept_fn: Callable[[object, int], None],
             vocab: int, tokens: list[int], batch: int) -> dict:
    rss0 = _rss_mb()
    t = time.perf_counter()
    compiled = compile_fn()
    compile_s = time.perf_counter() - t
    out = {"backend": name, "compile_ms": round(compile_s * 1000, 1)}
    for b in (1, batch):
        ms = matchers_fn(compiled, b)
        bits = np.full((b, (vocab + 31) // 32), -1, dtype=np.int32)
        times = []
        for tok in tokens:
            t = time.perf_counter()
            fill_fn(ms, bits)
            times.append(time.perf_counter() - t)
            for m in ms:
                accept_fn(m, tok)
        out[f"mask_us_per_token_b{b}"] = round(1e6 * float(np.median(times)), 1)
        out[f"mask_us_per_row_b{b}"] = round(1e6 * float(np.median(times)) / b, 1)
    out["rss_growth_mb"] = round(_rss_mb() - rss0, 1)
    return out


def bench_llguidance(hf, eos: list[int], schema: dict, tokens: list[int], batch: int) -> dict:
    import llguidance
    import llguidance.numpy as lnp

    from orcinus.structured.llguidance_backend import LLGuidanceBackend
    from orcinus.structured.params import StructuredOutputsParams

    backend = LLGuidanceBackend(hf, eos)
    spec = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    executor = llguidance.LLExecutor()

    def compile_and_first_mask():
        # llguidance builds parts of the lexer lazily: count the first mask as part of compiling.
        compiled = backend.compile(spec)
        backend.fill_bitmask([compiled.new_matcher()], np.full((1, (backend.vocab_size + 31) // 32), -1, np.int32))
        return compiled

    def fill_par(ms, bits):
        lnp.fill_next_token_bitmask_par(executor, [(m._m, i) for i, m in enumerate(ms)], bits)

    rows = [_measure("llguidance (row loop, used)", compile_and_first_mask,
                     lambda c, b: [c.new_matcher() for _ in range(b)], backend.fill_bitmask,
                     lambda m, t: m.accept(t), backend.vocab_size, tokens, batch),
            _measure("llguidance (its thread pool)", compile_and_first_mask,
                     lambda c, b: [c.new_matcher() for _ in range(b)], fill_par,
                     lambda m, t: m.accept(t), backend.vocab_size, tokens, batch)]
    return rows


def bench_xgrammar(hf, eos: list[int], schema: dict, tokens: list[int], batch: int) -> dict:
    import torch
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf), stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    vocab = len(hf)

    def fill(ms, bits):
        t = torch.from_numpy(bits)
        for i, m in enumerate(ms):
            m.fill_next_token_bitmask(t, i)

    return _measure("xgrammar", lambda: compiler.compile_json_schema(json.dumps(schema), any_whitespace=False),
                    lambda c, b: [xgr.GrammarMatcher(c) for _ in range(b)], fill,
                    lambda m, t: m.accept_token(t), vocab, tokens, batch)


def bench_outlines(hf, eos: list[int], schema: dict, tokens: list[int], batch: int) -> dict:
    import torch
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    vocab_size = len(hf)
    pieces = hf.backend_tokenizer.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
    mapping: dict[str, list[int]] = {}
    for i, piece in enumerate(pieces):
        if i not in eos and piece:
            mapping.setdefault(piece, []).append(i)
    vocabulary = Vocabulary(eos[0], mapping)

    def fill(ms, bits):
        t = torch.from_numpy(bits)
        for i, g in enumerate(ms):
            row = t[i]
            g.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    return _measure("outlines-core", lambda: Index(build_regex_from_schema(json.dumps(schema)), vocabulary),
                    lambda c, b: [Guide(c) for _ in range(b)], fill,
                    lambda g, t: g.advance(t), vocab_size, tokens, batch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=60, help="tokens of the document each matcher walks")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--backends", default="llguidance,xgrammar,outlines")
    args = ap.parse_args(argv)

    from orcinus.models.loader import default_model_path
    from orcinus.tokenizer import Tokenizer

    tok = Tokenizer.from_model_path(default_model_path())
    schema = schema_20_fields()
    tokens = tok.encode(sample_document(), add_special_tokens=False)[:args.tokens]
    runners = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar, "outlines": bench_outlines}
    for name in args.backends.split(","):
        try:
            rows = runners[name](tok.hf, tok.eos_token_ids, schema, tokens, args.batch)
        except ImportError as exc:
            rows = {"backend": name, "error": f"not installed ({exc})"}
        except Exception as exc:  # a backend that cannot handle this vocabulary or schema
            rows = {"backend": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        for row in rows if isinstance(rows, list) else [rows]:
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
