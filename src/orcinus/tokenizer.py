"""Tokenizer (text <-> ids, chat template) and incremental detokenizers for streaming.

The tokenizer comes from `transformers`, built either from a Hugging Face folder or from the
vocabulary, merges and chat template stored in a GGUF file's metadata. Streaming detokenisation
runs in Rust (`tokenizers`' DecodeStream) when the tokenizer is a plain fast tokenizer, and in
Python over `decode` otherwise; both give the text `decode` gives for the whole output.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from transformers import PreTrainedTokenizerBase

from orcinus.errors import TokenizerNotFound  # noqa: F401  (re-exported: raised here)

# Any one of these makes a folder worth handing to AutoTokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
    "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tekken.json",
)
# GGUF metadata keys naming tokens that end a turn besides EOS (llama.cpp's "end of generation").
_GGUF_EXTRA_EOS_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# Prompt tokens decoded ahead of the first output token, so that the first output token is decoded
# as a continuation (SentencePiece drops the leading space of the first token of a string).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"
# transformers' decode methods that hand ids straight to the Rust tokenizer (no Python post-processing
# besides the clean-up we switch off): only then does DecodeStream give the same text as `decode`.
_PLAIN_FAST_DECODES = ("TokenizersBackend._decode", "PreTrainedTokenizerFast._decode")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class Tokenizer:
    """A thin wrapper that fixes the few choices a serving engine needs to make consistently."""

    def __init__(self, hf: PreTrainedTokenizerBase, extra_eos_token_ids: Sequence[int] = ()) -> None:
        self._hf = hf
        eos = _ids(hf.eos_token_id) + [int(i) for i in extra_eos_token_ids]
        self._eos_token_ids = list(dict.fromkeys(eos))  # dedupe, keep order
        # id -> decode([id]) for logprob entries; filled on demand, at most one entry per vocabulary id
        self._pieces: dict[int, str] = {}

    @classmethod
    def from_model_path(cls, path: str, trust_remote_code: bool = False) -> "Tokenizer":
        """From a Hugging Face checkpoint folder or a `.gguf` file."""
        path = os.path.expanduser(path)
        if os.path.isfile(path) and path.endswith(".gguf"):
            return cls._from_gguf(path)  # built from the file's metadata: no code to trust
        if not os.path.isdir(path):
            raise TokenizerNotFound(f"tokenizer path {path!r} is neither a folder nor a .gguf file")
        if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            raise TokenizerNotFound(
                f"{path} has no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)}); "
                "point --tokenizer at a folder that has them, or use skip_tokenizer_init"
            )
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        # Instruct models often end a turn with a token other than the tokenizer's EOS, and list
        # it only in generation_config.json (e.g. Llama 3's <|eot_id|>).
        extra: list[int] = []
        gen_cfg = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_cfg):
            with open(gen_cfg) as f:
                extra = _ids(json.load(f).get("eos_token_id"))
        return cls(hf, extra)

    @classmethod
    def _from_gguf(cls, path: str) -> "Tokenizer":
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        from orcinus.models.gguf_loader import read_gguf_metadata

        folder, name = os.path.split(os.path.abspath(path))
        try:
            # The generic fast class is what AutoTokenizer settles on for GGUF files, but building
            # it directly skips AutoTokenizer's detour through the model config, which re-reads the
            # whole GGUF header with gguf's slow reader (about 2.5 s against 6 s for SmolLM2).
            hf = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name, local_files_only=True)
        except (ValueError, KeyError, OSError, NotImplementedError):
            hf = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        metadata = read_gguf_metadata(path)
        template = metadata.get("tokenizer.chat_template")
        if template and not getattr(hf, "chat_template", None):
            hf.chat_template = template  # older transformers left it out
        extra = [int(metadata[k]) for k in _GGUF_EXTRA_EOS_KEYS if metadata.get(k) is not None]
        return cls(hf, extra)

    # -- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # No clean-up of "tokenization spaces": it rewrites " ." to "." and the like, which damages
        # code, and it would make streamed deltas disagree with the final text.
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        return self._hf.convert_ids_to_tokens(ids)

    def token_pieces(self, ids: Sequence[int]) -> list[str]:
        """`decode([id], skip_special_tokens=False)` for each id (the text of a logprob entry),
        cached: a token's piece never changes, and the same few thousand ids come up again and again."""
        cache = self._pieces
        missing = list(dict.fromkeys(i for i in ids if i not in cache))
        if missing:
            backend = self.backend_tokenizer
            if backend is not None:  # one call into Rust for all of them
                pieces = backend.decode_batch([[i] for i in missing], skip_special_tokens=False)
            else:
                pieces = [self.decode([i], skip_special_tokens=False) for i in missing]
            cache.update(zip(missing, pieces))
        return [cache[i] for i in ids]

    @property
    def backend_tokenizer(self):
        """The Rust `tokenizers.Tokenizer` when decoding through it gives exactly what `decode`
        gives (a fast tokenizer whose class adds no Python post-processing), else None."""
        if not getattr(self._hf, "is_fast", False):
            return None
        if getattr(type(self._hf)._decode, "__qualname__", "") not in _PLAIN_FAST_DECODES:
            return None
        return getattr(self._hf, "backend_tokenizer", None)

    def incremental_detokenizer(self, prompt_token_ids: Sequence[int],
                                skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        """The fastest detokenizer that gives `decode`'s text for this tokenizer."""
        if self.backend_tokenizer is not None:
            return StreamDetokenizer(self, prompt_token_ids, skip_special_tokens)
        return IncrementalDetokenizer(self, prompt_token_ids, skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return getattr(self._hf, "chat_template", None)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render a conversation to prompt text with the model's own template."""
        if not self.chat_template:
            raise ValueError(
                "this tokenizer has no chat template, so chat messages cannot be turned into a prompt; "
                "use the completions API with plain text, or a model/tokenizer that ships a template"
            )
        try:
            return self._hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except ValueError:
            raise
        except Exception as exc:  # a template may refuse a conversation (e.g. roles out of order)
            raise ValueError(f"the model's chat template cannot render these messages: {exc}") from exc

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> dict:
        """A conversation as an engine prompt: {"prompt": text, "prompt_token_ids": ids}.

        The template writes any BOS itself, so none is added when encoding (adding one would
        double it for e.g. Llama 3). Every chat front end (LLM.chat, `orcinus chat`, the chat
        endpoint) goes through here, so they all build the same tokens for the same messages."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return {"prompt": text, "prompt_token_ids": self.encode(text, add_special_tokens=False)}

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of a rendered conversation (see chat_prompt)."""
        return self.chat_prompt(messages, add_generation_prompt, **kwargs)["prompt_token_ids"]

    # -- properties ---------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_token_ids)

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included."""
        return len(self._hf)

    @property
    def hf(self) -> PreTrainedTokenizerBase:
        return self._hf


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas as they arrive.

    Two offsets into the token list bound the work per token: `read_offset` is where already
    emitted text ends, `prefix_offset` a little before it. Each step decodes only
    ids[prefix_offset:] and ids[prefix_offset:read_offset] and emits the difference, so the cost
    is O(window) rather than O(length), while the leading context keeps word spacing right.

    Byte-level BPE can split one character (an emoji, CJK) across tokens; the partial bytes
    decode to U+FFFD. Text ending in U+FFFD is held back until a later token completes it;
    `flush()` releases whatever is left at the end (a truly invalid sequence), as `decode` would.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - _PROMPT_CONTEXT_TOKENS, 0)
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _emit(self, force: bool) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(prefix_text):
            return ""  # e.g. a skipped special token: nothing visible yet
        if new_text.endswith(_REPLACEMENT_CHAR) and not force:
            return ""  # an incomplete UTF-8 sequence: wait for the tokens that finish it
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text += delta
        return delta

    def add_token(self, token_id: int) -> str:
        """Append one generated token; return the newly completed text (possibly empty)."""
        self._ids.append(int(token_id))
        return self._emit(force=False)

    def flush(self) -> str:
        """At the end of generation: emit anything held back, invalid bytes as U+FFFD."""
        if self._read_offset == len(self._ids):
            return ""
        return self._emit(force=True)


class StreamDetokenizer(IncrementalDetokenizer):
    """IncrementalDetokenizer's contract on `tokenizers.decoders.DecodeStream`: the same two-window
    algorithm (emit the new text once it does not end in U+FFFD), done in Rust, about five times
    cheaper per token than two `decode` calls through transformers.

    DecodeStream starts from the last few prompt ids (word spacing of the first output token) and
    has no flush; it raises when a window's text does not extend the previous one, and repeats the
    prompt's text when the prompt stops inside a character. There the Python detokenizer takes
    over (from the last emitted token, with the same context), so the text is always what the
    Python detokenizer gives: `decode` of the whole output.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._backend = tokenizer.backend_tokenizer
        self._context = [int(i) for i in prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]]
        self._stream = DecodeStream(self._context, skip_special_tokens=skip_special_tokens)
        self._out: list[int] = []  # output ids
        self._emitted = 0  # output ids whose text has gone out
        self._python: IncrementalDetokenizer | None = None  # after a refusal: the rest in Python
        self._text = ""
        if self._context and self._backend.decode(self._context, skip_special_tokens=skip_special_tokens
                                                  ).endswith(_REPLACEMENT_CHAR):
            # The prompt stops inside a character: DecodeStream would repeat the prompt's text
            # once the output completes it, so this request streams in Python.
            self._python = IncrementalDetokenizer(tokenizer, self._context, skip_special_tokens)

    def _take_over(self) -> IncrementalDetokenizer:
        """A Python detokenizer positioned at the last emitted token, fed the held-back ones."""
        python = IncrementalDetokenizer(self.tokenizer, self._context + self._out[:self._emitted],
                                        self.skip_special_tokens)
        self._text += "".join(python.add_token(t) for t in self._out[self._emitted:])
        return python

    def add_token(self, token_id: int) -> str:
        token_id = int(token_id)
        self._out.append(token_id)
        before = len(self._text)
        if self._python is not None:
            delta = self._python.add_token(token_id)
            self._text += delta
            return delta
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception:  # DecodeStream's "invalid prefix": see the class docstring
            self._python = self._take_over()
            return self._text[before:]
        if piece is None:
            return ""
        self._emitted = len(self._out)
        self._text += piece
        return piece

    def flush(self) -> str:
        before = len(self._text)
        if self._python is None:
            if self._emitted == len(self._out):
                return ""
            self._python = self._take_over()  # releases the held-back tokens' text (may be "")
        self._text += self._python.flush()
        return self._text[before:]
