"""GGUF files of the quantisation types users download (Q4_K_M, Q5_K, Q6_K, Q8_0, F16, BF16).

Each file is written here with the `gguf` package; orcinus's loaded weights must equal what
`gguf.quants.dequantize` makes of the stored blocks (in Hugging Face row order), and a greedy
run of orcinus on the file must match transformers' own GGUF loading of the same file.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from gguf_files import gguf_name, llamacpp_permute, tiny_model, transformers_gguf_model, write_gguf
from orcinus.models.gguf_loader import read_gguf

# Rows of 256 so that every k-quant block fits; small enough to build and run in well under a second.
_DIMS = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _q4_k_m(name: str):
    """llama.cpp's Q4_K_M recipe, in miniature: Q6_K for the output, token embedding and half the
    attn_v / ffn_down tensors, Q4_K for the rest."""
    if name in ("lm_head.weight", "model.embed_tokens.weight"):
        return T.Q6_K
    if name.endswith(("v_proj.weight", "down_proj.weight")) and ".0." in name:
        return T.Q6_K
    return T.Q4_K


_MIXES = {
    "Q4_K_M": _q4_k_m,
    "Q5_K": lambda name: T.Q5_K,
    "Q6_K": lambda name: T.Q6_K,
    "Q8_0": lambda name: T.Q8_0,
    "F16": lambda name: T.F16,
    "BF16": lambda name: T.BF16,
}


def _write(tmp_path, mix: str, arch: str = "llama") -> tuple[str, object, dict[str, np.ndarray], dict]:
    config, state = tiny_model(arch, **_DIMS)
    qtypes = {name: _MIXES[mix](name) for name in state}
    path = str(tmp_path / f"tiny-{arch}-{mix}.gguf")
    decoded = write_gguf(path, arch, config, state, permute=arch == "llama", qtypes=qtypes)
    return path, config, decoded, qtypes


@pytest.mark.parametrize("mix", sorted(_MIXES))
def test_weights_equal_gguf_dequantize(tmp_path, mix: str) -> None:
    path, config, decoded, qtypes = _write(tmp_path, mix)
    cfg, weights = read_gguf(path)
    weights = dict(weights)
    assert set(weights) == set(qtypes)
    for name, w in weights.items():
        assert w.dtype == torch.float32 and w.is_contiguous(), name
        got = w.numpy()
        # llama.cpp stores Q/K rows in its own order; orcinus hands back Hugging Face's.
        if name.endswith("q_proj.weight"):
            got = llamacpp_permute(got, config.num_attention_heads)
        if name.endswith("k_proj.weight"):
            got = llamacpp_permute(got, config.num_key_value_heads)
        np.testing.assert_array_equal(got, decoded[gguf_name(name)], err_msg=name)
    # The types really are the ones asked for (a writer that fell back to F32 would pass above).
    from orcinus.models.gguf_loader import read_gguf_header

    stored = {t.name: T(t.ggml_type) for t in read_gguf_header(path).tensors}
    assert {stored[gguf_name(n)] for n, q in qtypes.items() if weights[n].ndim == 2} == set(
        q for n, q in qtypes.items() if weights[n].ndim == 2)


@pytest.mark.parametrize("mix", sorted(_MIXES))
def test_greedy_run_matches_transformers_gguf(tmp_path, mix: str) -> None:
    from orcinus import LLM, SamplingParams

    path, _, _, _ = _write(tmp_path, mix)
    hf = transformers_gguf_model(path)
    # The dequantised path: transformers dequantises too (the quantized one: test_gguf_quantized.py).
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", device="cpu", kv_cache_memory=1 << 22, block_size=8,
              quantization="none")
    prompts = [[1, 17, 99, 200, 5, 42], [1, 250, 3]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=12, temperature=0.0,
                                                                                  ignore_eos=True))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0, min_new_tokens=12)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == ref
        assert len(set(ref)) > 2, f"degenerate reference {ref}: the comparison would prove little"
        # and the logits themselves, at the prompt's last position
        with torch.no_grad():
            hf_logits = hf(torch.tensor([p])).logits[0, -1]
        assert int(hf_logits.argmax()) == ref[0]
