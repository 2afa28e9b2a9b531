"""Read a GGUF file (llama.cpp's format) as a Hugging Face config dict plus HF-named float32 weights.

Why a header parser of our own: `gguf.GGUFReader` builds a numpy view per metadata element, which
for a vocabulary of ~50k tokens and ~50k merges takes ~4 s before a single weight is read. The GGUF
header is a simple length-prefixed format, so walking it with `struct` takes tens of milliseconds.
Dequantisation itself is left to `gguf.quants.dequantize` (numpy, vectorised per tensor).

Layout notes:
- GGUF lists dimensions fastest-first (`ne0` = input features), so the numpy shape is the reverse,
  which is exactly PyTorch's `nn.Linear` layout `[out_features, in_features]`: no transpose needed.
- llama.cpp's converter reorders the rows of Q and K for the `llama` architecture (its rotary pairs
  adjacent elements; Hugging Face's pairs element i with i + head_dim/2), so those rows are put back
  here. Qwen2/Qwen3 files use llama.cpp's NEOX rotary, whose pairing already matches HF: no reorder.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from orcinus.models.registry import UnsupportedModel

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf.GGUFValueType): fixed-width scalars as struct formats.
_SCALAR_FORMATS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_NUMPY_DTYPES: dict[int, str] = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8",
}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 per dequantisation step

# GGUF architecture name -> HF model_type; the ones whose Q/K rows llama.cpp permuted.
_ARCHITECTURES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_PERMUTED_QK = {"llama"}

# Per-layer GGUF tensor suffix -> HF parameter suffix (layer prefix `model.layers.N.` added).
_LAYER_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors that carry no HF parameter: their content is folded into the config instead.
_CONFIG_ONLY_TENSORS = {"rope_freqs.weight"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy/torch order (GGUF's dims reversed)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo] = field(default_factory=list)

    def tensor(self, name: str) -> GGUFTensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)


@dataclass(frozen=True)
class SkippedArray:
    """Stands in for a metadata array of strings that was not decoded (e.g. the 50k vocabulary
    pieces, which loading weights never needs); `length` is its element count."""

    length: int


class _Cursor:
    """Sequential little-endian reader over a buffer (the mmapped file)."""

    def __init__(self, buf: Any, path: str, string_arrays: bool) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.string_arrays = string_arrays

    def scalar(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as e:
            raise ValueError(f"{self.path}: GGUF header is truncated") from e
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        if len(raw) != n:
            raise ValueError(f"{self.path}: GGUF header is truncated")
        self.pos += n
        # Token pieces can hold bytes that are not valid UTF-8 on their own; keep them visible.
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            v = self.scalar(_SCALAR_FORMATS[vtype])
            # f32 metadata (eps, rope base) read back as the shortest decimal that names the same
            # float32, e.g. 1e-05 rather than 9.999999747378752e-06, as in the original config.json.
            return float(str(np.float32(v))) if vtype == _FLOAT32 else v
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.scalar("<I")
            count = self.scalar("<Q")
            if etype in _NUMPY_DTYPES:
                dt = np.dtype(_NUMPY_DTYPES[etype])
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos += count * dt.itemsize
                return arr.tolist()
            if etype == _STRING and not self.string_arrays:
                for _ in range(count):  # hop over each length-prefixed string without decoding it
                    self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
                return SkippedArray(count)
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown GGUF metadata value type {vtype}")


def _parse_header(buf: Any, path: str, string_arrays: bool) -> GGUFHeader:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if bytes(buf[:4]) != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
    cur = _Cursor(buf, path, string_arrays)
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        # v1 used 32-bit counts; a byte-swapped (big-endian) file shows up here as a huge number.
        raise ValueError(f"{path}: GGUF version {version} is not supported (need 2 or 3, little-endian)")
    n_tensors = cur.scalar("<Q")
    n_kv = cur.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        ggml_type = cur.scalar("<I")
        offset = cur.scalar("<Q")
        raw_infos.append((name, dims, ggml_type, offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, dims, ggml_type, offset in raw_infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError) as e:
            raise UnsupportedModel(f"{path}: tensor {name} has unknown ggml type {ggml_type}") from e
        n_elems = math.prod(dims)
        if dims and dims[0] % block:
            raise ValueError(f"{path}: tensor {name} row of {dims[0]} is not a whole number of blocks")
        nbytes = n_elems // block * type_size
        start = data_start + offset
        if start + nbytes > len(buf):
            raise ValueError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
        tensors.append(GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, start, nbytes))
    return GGUFHeader(version, metadata, tensors)


def read_gguf_header(path: str, string_arrays: bool = False) -> GGUFHeader:
    """Metadata and tensor directory of a GGUF file, without reading any weights.

    Arrays of strings (vocabulary, merges) become `SkippedArray` unless `string_arrays` is set.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return _parse_header(mm, path, string_arrays)


def read_gguf_metadata(path: str, string_arrays: bool = False) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (e.g. `tokenizer.chat_template`)."""
    return read_gguf_header(path, string_arrays).metadata


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order.

    Within each head of `head_dim` rows, HF's order is [first halves..., second halves...] (rotate
    half); llama.cpp interleaves them so that the rotary pair (i, i + head_dim/2) sits at rows
    (2i, 2i + 1). Viewing rows as (head, i, pair) and swapping to (head, pair, i) restores HF's order.
    Works for weights [rows, in] and biases [rows] alike.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _CONFIG_ONLY_TENSORS:
        return None
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise UnsupportedModel(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in orcinus")


def _uniform(value: Any, what: str) -> int:
    """Some GGUFs store per-layer arrays (e.g. head_count_kv); orcinus needs one value for all."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModel(f"per-layer {what} {sorted(set(value))} is not supported")
        return int(value[0])
    return int(value)


def _llama3_rope_scaling(
    factors: np.ndarray, head_dim: int, theta: float, original_len: int
) -> dict[str, Any]:
    """Recover HF's `llama3` rope_scaling from llama.cpp's precomputed `rope_freqs` tensor.

    llama.cpp stores, per frequency, the divisor 1 / ((1 - s) / factor + s) where the smoothing s is
    (original_len / wavelength - low) / (high - low) inside the transition band. So factor is the
    largest divisor and, from the band's points, original_len / wavelength is linear in s with
    intercept `low` and slope `high - low`.
    """
    factor = float(factors.max())
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ratio = original_len * inv_freq / (2 * math.pi)  # original_len / wavelength
    low, high = 1.0, 4.0  # Llama 3.x values, used when the band holds too few points to fit
    if factor > 1.0:
        inv_factor = 1.0 / factor
        s = (1.0 / factors.astype(np.float64) - inv_factor) / (1.0 - inv_factor)
        band = (s > 1e-4) & (s < 1 - 1e-4)
        if band.sum() >= 2:
            slope, intercept = np.polyfit(s[band], ratio[band], 1)
            low, high = float(round(intercept, 4)), float(round(intercept + slope, 4))
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original_len,
    }


def _dequantize(mm: Any, info: GGUFTensorInfo) -> np.ndarray:
    """One tensor as float32, in chunks handed to `gguf.quants.dequantize`.

    Blocks never straddle chunk edges (a chunk is a whole number of blocks, and rows are too), so
    each chunk can be passed as one long row: gguf then vectorises across the whole chunk instead
    of looping over groups of 16 short rows, which is several times faster.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(info.ggml_type)
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.frombuffer(mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    n_blocks = info.nbytes // type_size
    out = np.empty(n_blocks * block, dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // block)  # bounds the temporaries numpy makes per chunk
    for first in range(0, n_blocks, step):
        last = min(first + step, n_blocks)
        chunk = raw[first * type_size:last * type_size].reshape(1, -1)
        out[first * block:last * block] = dequantize(chunk, qtype).reshape(-1)
    return out.reshape(info.shape)


def _build_config(header: GGUFHeader, path: str) -> tuple[dict[str, Any], str]:
    md = header.metadata
    arch = md.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModel(
            f"{path}: GGUF architecture {arch!r} is not supported; orcinus reads GGUF files of "
            f"architecture {', '.join(sorted(_ARCHITECTURES))} (or give a Hugging Face checkpoint folder)"
        )

    def get(key: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{key}", default)

    embd = header.tensor("token_embd.weight")
    if embd is None:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight")
    hidden = int(get("embedding_length", embd.shape[1]))
    num_heads = _uniform(get("attention.head_count"), "attention head count")
    num_kv = _uniform(get("attention.head_count_kv", num_heads), "key/value head count")
    head_dim = int(get("attention.key_length", hidden // num_heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModel(f"{path}: partial rotary (rope dim {rope_dim} of head dim {head_dim}) is not supported")
    rope_theta = float(get("rope.freq_base", 10000.0))
    context = int(get("context_length", 4096))
    model_type = _ARCHITECTURES[arch]

    cfg: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [f"{model_type.capitalize()}ForCausalLM"],
        "vocab_size": embd.shape[0],  # the weight's own row count is what the model must match
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv,
        "head_dim": head_dim,
        "intermediate_size": _uniform(get("feed_forward_length"), "feed-forward size"),
        "max_position_embeddings": context,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": header.tensor("output.weight") is None,
        "attention_bias": header.tensor("blk.0.attn_q.bias") is not None,
        "hidden_act": "silu",
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
    }
    # End of generation: the EOS token plus chat models' end-of-turn / end-of-message tokens.
    eos = [md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
           if md.get(k) is not None]
    eos = list(dict.fromkeys(int(e) for e in eos))
    cfg["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)

    scaling_type = get("rope.scaling.type")
    original_len = int(get("rope.scaling.original_context_length", 0)) or None
    rope_freqs = header.tensor("rope_freqs.weight")
    if rope_freqs is not None:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            factors = _dequantize(mm, rope_freqs).reshape(-1)
        # Llama 3.x: pre-extension context 8192 (the file rarely records it).
        cfg["rope_scaling"] = _llama3_rope_scaling(factors, head_dim, rope_theta, original_len or 8192)
    elif scaling_type in ("linear", "yarn"):
        cfg["rope_scaling"] = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor", 1.0))}
        if original_len:
            cfg["rope_scaling"]["original_max_position_embeddings"] = original_len
        if scaling_type == "yarn":
            for key, name in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")):
                if get(key) is not None:
                    cfg["rope_scaling"][name] = float(get(key))
            # Attention-factor overrides change every logit; refuse them rather than ignore them.
            for key in ("rope.scaling.attn_factor", "rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_ext_factor",
                        "rope.scaling.yarn_attn_factor"):
                if get(key) is not None:
                    raise UnsupportedModel(f"{path}: YaRN with {arch}.{key} is not supported; orcinus runs YaRN "
                                           "with factor, original context and beta_fast/beta_slow only")
    elif scaling_type not in (None, "none"):
        raise UnsupportedModel(f"{path}: rope scaling {scaling_type!r} is not supported")
    return cfg, arch


def read_gguf(path: str, keep_quantized: bool = False) -> tuple[dict[str, Any], Iterator[tuple[str, Any]]]:
    """(HF-style config dict, lazy iterator of (HF parameter name, float32 tensor in HF layout)).

    The config is built now; each weight is dequantised only when the iterator reaches it, so peak
    memory is one float32 tensor on top of the model being filled. With `keep_quantized`, every
    2-D tensor comes as a `GGUFTensor` instead: its raw blocks where the quantized kernels read
    its type (layers/quantized_linear.py), else its float32 values; the layers keep what they can.
    """
    header = read_gguf_header(path)
    cfg, arch = _build_config(header, path)
    # Resolve every name up front so an unsupported file fails before any weight is loaded.
    names = [(info, _hf_name(info.name)) for info in header.tensors]
    permute_heads = {
        "self_attn.q_proj": cfg["num_attention_heads"],
        "self_attn.k_proj": cfg["num_key_value_heads"],
    } if arch in _PERMUTED_QK else {}

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for info, hf_name in names:
                if hf_name is None:
                    continue
                if keep_quantized and len(info.shape) == 2:
                    yield hf_name, _gguf_tensor(mm, info, hf_name, permute_heads)
                    continue
                w = _dequantize(mm, info)
                module = hf_name.rsplit(".", 1)[0].split(".", 3)[-1]  # e.g. "self_attn.q_proj"
                if module in permute_heads:
                    w = _unpermute_qk(w, permute_heads[module])
                # `_dequantize` writes into a fresh array, so nothing here refers to the mmap.
                yield hf_name, torch.from_numpy(np.ascontiguousarray(w))

    return cfg, weights()


def _gguf_tensor(mm: Any, info: GGUFTensorInfo, hf_name: str, permute_heads: dict[str, int]) -> Any:
    """One 2-D tensor in its stored form: raw blocks (a copy, so nothing refers to the mmap) for the
    types the quantized kernels read, float32 otherwise; Q/K rows put back in HF's order (rows are
    whole blocks, so the raw rows move as they are)."""
    from orcinus.layers.quantized_linear import FLOAT, QUANT_TYPES, GGUFTensor

    module = hf_name.rsplit(".", 1)[0].split(".", 3)[-1]
    rows, cols = info.shape
    if info.ggml_type in QUANT_TYPES:
        w = np.frombuffer(mm, dtype=np.uint8, count=info.nbytes, offset=info.offset).reshape(rows, -1)
        qtype = info.ggml_type
    else:
        w, qtype = _dequantize(mm, info), FLOAT
    if module in permute_heads:
        w = _unpermute_qk(w, permute_heads[module])
    return GGUFTensor(qtype, torch.from_numpy(np.array(w, copy=True, order="C")), (rows, cols))
