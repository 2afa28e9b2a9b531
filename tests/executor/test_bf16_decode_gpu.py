"""The bfloat16 decode path over many steps (CUDA's default dtype, the path the GPU benchmark
times): CUDA-graph replay against the eager Triton path, and against the reference backend.

Two workers run in lockstep on the same requests: every step both get the same tokens (the first
worker's greedy choice), so their logits compare step by step over the same history, while
contexts grow across many KV blocks. The gpu-marked tests skip without CUDA (tests/conftest.py);
the CPU test runs the same lockstep driver on the CPU's backends so the driver itself is checked
in CI."""
from __future__ import annotations

import pytest
import torch

from orcinus.config import EngineConfig
from orcinus.executor.messages import BatchMessage, CachedRequestData, NewRequestData, SamplingSettings
from orcinus.executor.worker import Worker

BLOCK = 16
STEPS = 48
PROMPT_LENS = (3, 17, 40, 64, 90, 129, 150, 200)  # 8 requests, contexts up to 248 tokens: 16 blocks


@pytest.fixture(scope="module")
def qwen3_real_heads(tmp_path_factory) -> str:
    """Qwen3-0.6B's attention shapes (head_dim 128, 4 query heads per KV head) in 2 small layers."""
    import transformers as tf
    from checkpoints import build_from_config

    folder = str(tmp_path_factory.mktemp("qwen3-heads"))
    build_from_config(tf.Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, head_dim=128, vocab_size=320,
                                     max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.3,
                                     bos_token_id=1, eos_token_id=2), folder)
    return folder


def _worker(folder: str, device: str, dtype: str, backend: str, enforce_eager: bool) -> Worker:
    if backend == "triton":
        pytest.importorskip("triton", reason="the Triton backend needs triton")
    worker = Worker(EngineConfig(model=folder, dtype=dtype, device=device, kv_cache_memory=1 << 24, block_size=BLOCK,
                                 attention_backend=backend, max_num_seqs=len(PROMPT_LENS), enforce_eager=enforce_eager))
    worker.initialize_kv_cache(worker.available_kv_blocks())
    return worker


def _lockstep(a: Worker, b: Worker, steps: int = STEPS) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Prefill then `steps` decode steps on both; returns each step's log-probs (float32, CPU) of
    both workers and how many steps `a` replayed a CUDA graph."""
    logits: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for i, w in enumerate((a, b)):
        original = w.runner.forward_logits

        def capture(inp, hidden=None, original=original, i=i):
            out = original(inp) if hidden is None else original(inp, hidden)
            logits[i].append(torch.log_softmax(out.float(), -1).cpu())
            return out

        w.runner.forward_logits = capture
    replays = []
    if a.runner.graphs is not None:
        replay = a.runner.graphs.replay
        a.runner.graphs.replay = lambda padded: replays.append(padded) or replay(padded)
    g = torch.Generator().manual_seed(11)
    blocks_per_req = -(-(max(PROMPT_LENS) + steps + 1) // BLOCK)
    news = [NewRequestData(f"r{i}", torch.randint(3, 320, (n,), generator=g).tolist(), SamplingSettings(temperature=0.0),
                           list(range(i * blocks_per_req, (i + 1) * blocks_per_req)))
            for i, n in enumerate(PROMPT_LENS)]
    msg = BatchMessage(0, news)
    for step in range(steps + 1):
        tokens = a.execute(msg).token_ids
        b.execute(msg)  # its own greedy tokens are not used: both continue with a's
        msg = BatchMessage(step + 1, [CachedRequestData(r.request_id, t) for r, t in zip(news, tokens)])
    return logits[0], logits[1], len(replays)


def _assert_close_steps(got: list[torch.Tensor], want: list[torch.Tensor], min_cosine: float, max_prob_diff: float,
                        steps: int = STEPS):
    assert len(got) == len(want) == steps + 1
    for step, (x, y) in enumerate(zip(got, want)):
        assert x.shape == y.shape == (len(PROMPT_LENS), 320)
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
        assert bool((cos > min_cosine).all()), f"step {step}: cosine {cos.min():.6f}"
        diff = (x.exp() - y.exp()).abs().max()
        assert diff < max_prob_diff, f"step {step}: probabilities differ by {diff:.4f}"


@pytest.mark.gpu
def test_bf16_graph_replay_matches_eager_over_many_decode_steps(qwen3_real_heads):
    graphs = _worker(qwen3_real_heads, "cuda", "bfloat16", "triton", enforce_eager=False)
    eager = _worker(qwen3_real_heads, "cuda", "bfloat16", "triton", enforce_eager=True)
    assert graphs.runner.graphs is not None and eager.runner.graphs is None
    got, want, replays = _lockstep(graphs, eager)
    assert replays == STEPS  # every decode step replayed a graph; the prefill ran eagerly
    # same kernels on the same inputs; only the padded rows change the matmuls' shapes
    _assert_close_steps(got, want, min_cosine=0.9999, max_prob_diff=5e-3)


@pytest.mark.gpu
def test_bf16_graph_replay_matches_the_reference_backend_over_many_decode_steps(qwen3_real_heads):
    graphs = _worker(qwen3_real_heads, "cuda", "bfloat16", "triton", enforce_eager=False)
    reference = _worker(qwen3_real_heads, "cuda", "bfloat16", "reference", enforce_eager=True)
    got, want, replays = _lockstep(graphs, reference)
    assert replays == STEPS
    # bfloat16 keeps about 3 significant digits; the kernel accumulates in float32, the reference
    # in bfloat16 matmuls: a loose bound, far tighter than a wrong attention (random logits)
    _assert_close_steps(got, want, min_cosine=0.999, max_prob_diff=0.03)


def test_the_lockstep_driver_on_cpu_backends(qwen3_real_heads):
    paged = _worker(qwen3_real_heads, "cpu", "float32", "paged", enforce_eager=True)
    reference = _worker(qwen3_real_heads, "cpu", "float32", "reference", enforce_eager=True)
    got, want, replays = _lockstep(paged, reference, steps=6)  # few steps: the CPU checks the driver
    assert replays == 0
    _assert_close_steps(got, want, min_cosine=0.99999, max_prob_diff=1e-4, steps=6)
