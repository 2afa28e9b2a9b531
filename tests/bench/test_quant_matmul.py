"""`python -m orcinus.bench.quant_matmul`: every path of every shape timed, the packed layout where
this build packs (AVX-512 tiles)."""
from __future__ import annotations

from orcinus.bench import quant_matmul
from orcinus.layers import quant_native


def test_every_path_is_timed(capsys) -> None:
    results = quant_matmul.run([1, 7], repeat=1)
    assert [(r["shape"], r["rows"]) for r in results] == [(s[0], rows) for s in quant_matmul.SHAPES for rows in (1, 7)]
    packs = quant_native.load().orcinus_quant_tile_rows() > 0
    for r in results:
        assert all(r[key] > 0 for key in ("kernel_ms", "dequant_gemm_ms", "dequant_gemm_bf16_ms", "float32_ms"))
        assert (r["packed_ms"] is not None and r["packed_ms"] > 0) == packs
    assert "packed" in capsys.readouterr().out
