"""Tokenizers (text <-> token ids) and the incremental detokenizer that turns a token stream into
text deltas.

Engines work on token ids only; the router owns tokenization and detokenization (see DESIGN.md).
Two tokenizers exist: ``ByteTokenizer`` for the built-in ``tiny`` model (one token per UTF-8
byte) and ``HFTokenizer`` for a Hugging Face ``tokenizer.json``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

# Marks a directory exported by ``fdpd.model.tiny.export_tiny`` as using ``ByteTokenizer``.
BYTE_TOKENIZER_CLASS = "FdpdByteTokenizer"
# Prompt tokens decoded in front of the output, so that the first output token is rendered as a
# continuation of the prompt (as vLLM does).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Tokenizer(ABC):
    """Text <-> token ids. Implementations set the attributes in ``__init__``; both methods are
    pure (no state changes), so one tokenizer may serve many requests at once."""

    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    vocab_size: int
    all_special_ids: tuple[int, ...]
    chat_template: str | None = None

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS in front when the model expects one (and whatever
        else the tokenizer adds) unless ``add_special_tokens`` is False."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Invalid UTF-8 becomes U+FFFD; it never raises on a valid id."""


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are raw UTF-8 bytes; then ``<bos>``=256, ``<eos>``=257, ``<pad>``=258; ids up to
    ``vocab_size - 1`` are reserved special tokens ``<extra_N>`` (the tiny model can emit them)."""

    BOS, EOS, PAD = 256, 257, 258
    _NAMES: ClassVar[dict[int, str]] = {BOS: "<bos>", EOS: "<eos>", PAD: "<pad>"}

    def __init__(self, vocab_size: int = 259):
        if vocab_size < 259:
            raise ValueError(f"vocab_size: ByteTokenizer needs at least 259 ids (256 bytes + "
                             f"bos/eos/pad), got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id = self.BOS
        self.eos_token_ids = (self.EOS,)
        self.all_special_ids = tuple(range(256, vocab_size))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.BOS, *text.encode("utf-8")] if add_special_tokens else list(text.encode())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        run = bytearray()
        for token in ids:
            token = int(token)
            if 0 <= token < 256:
                run.append(token)
                continue
            if not 256 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary "
                                 f"(0..{self.vocab_size - 1})")
            if not skip_special_tokens:
                parts.append(run.decode("utf-8", errors="replace"))
                run.clear()
                parts.append(self.token_name(token))
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_name(self, token: int) -> str:
        return self._NAMES.get(token, f"<extra_{token - 259}>")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (via the ``tokenizers`` library), with the BOS/EOS
    settings of ``tokenizer_config.json`` when present.

    ``eos_token_ids``/``bos_token_id`` come from the model's config/generation config; the EOS of
    ``tokenizer_config.json`` is added to them.
    """

    def __init__(self, model_dir: str | Path, eos_token_ids: Sequence[int] = (),
                 bos_token_id: int | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        directory = Path(model_dir)
        self._tok = RustTokenizer.from_file(str(directory / "tokenizer.json"))
        cfg = _read_json(directory / "tokenizer_config.json")
        bos = self._token_id(cfg.get("bos_token"))
        self.bos_token_id = bos if bos is not None else bos_token_id
        eos = [int(i) for i in eos_token_ids]
        cfg_eos = self._token_id(cfg.get("eos_token"))
        if cfg_eos is not None and cfg_eos not in eos:
            eos.append(cfg_eos)
        self.eos_token_ids = tuple(eos)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        self.all_special_ids = tuple(sorted(i for i, t in added.items() if t.special))
        # Llama-3 style tokenizers add BOS in their post-processor; SentencePiece conversions
        # often leave it to ``add_bos_token``. Add it ourselves only in the second case.
        post_adds_bos = (self.bos_token_id is not None and self.bos_token_id
                         in self._tok.encode("", add_special_tokens=True).ids)
        self._prepend_bos = (bool(cfg.get("add_bos_token", False)) and not post_adds_bos
                             and self.bos_token_id is not None)
        template = cfg.get("chat_template")
        jinja = directory / "chat_template.jinja"
        if not isinstance(template, str) and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        self.chat_template = template if isinstance(template, str) else None

    def _token_id(self, token: Any) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if self._prepend_bos and add_special_tokens:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas as they arrive.

    Only a small window of tokens is decoded per step (vLLM's prefix_offset/read_offset): the
    text of ``ids[prefix:read]`` is already emitted, and the delta is what decoding
    ``ids[prefix:]`` adds to it. Text ending in U+FFFD is held back: it is an incomplete UTF-8
    character or byte-fallback sequence that the next token may complete. Call ``flush`` when the
    output ends, to release text that never completed (a truly invalid byte sequence).

    The last few prompt tokens are decoded as context, so the first output token renders as a
    continuation of the prompt. For byte-level tokenizers (and ``ByteTokenizer``) the deltas plus
    ``flush()`` concatenate to exactly ``tokenizer.decode(output_ids)``; for SentencePiece-style
    (Metaspace) tokenizers the first token keeps the leading space that ``decode`` of the output
    alone would strip, as vLLM and OpenAI completions do. One more limit: a ByteFallback
    decoder (``<0xNN>`` tokens) renders a whole run of byte tokens as U+FFFD when any byte of
    the run is invalid, so for invalid byte runs the deltas may differ from ``decode``; valid
    text always matches.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        start = max(0, len(prompt_token_ids) - _PROMPT_CONTEXT_TOKENS)
        context = [int(t) for t in prompt_token_ids[start:]]
        if self._decode(context).endswith(_REPLACEMENT):
            context = []     # a prompt ending mid-character would swallow the output's bytes
        self._window = context          # ids[prefix_offset:], the only ids still decoded
        self._read = len(context)       # window[:read] is already emitted as text
        self._text = ""
        self.num_output_tokens = 0

    @property
    def text(self) -> str:
        """All output text emitted so far (held-back text excluded)."""
        return self._text

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        self._window.extend(int(t) for t in new_token_ids)
        self.num_output_tokens += len(new_token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """End of output: return held-back text even if it ends in U+FFFD."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._window):
            return ""
        prefix_text = self._decode(self._window[:self._read])
        new_text = self._decode(self._window)
        if len(new_text) <= len(prefix_text) or (not final
                                                 and new_text.endswith(_REPLACEMENT)):
            return ""
        delta = new_text[len(prefix_text):]
        # The emitted window becomes the next prefix: it gives the next tokens their context.
        del self._window[:self._read]
        self._read = len(self._window)
        self._text += delta
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def load_tokenizer(model_dir: str | Path, eos_token_ids: Sequence[int] = (),
                   bos_token_id: int | None = None) -> Tokenizer | None:
    """The tokenizer of a model directory, or None when it has none (no ``tokenizer.json`` and
    not an exported ``tiny``)."""
    directory = Path(model_dir)
    cfg = _read_json(directory / "tokenizer_config.json")
    if cfg.get("tokenizer_class") == BYTE_TOKENIZER_CLASS:
        return ByteTokenizer(int(cfg.get("vocab_size", 259)))
    if not (directory / "tokenizer.json").is_file():
        return None
    return HFTokenizer(directory, eos_token_ids, bos_token_id)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}
