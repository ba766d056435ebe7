"""Tokenizers and the incremental detokenizer: the streamed deltas must add up to exactly what
``decode`` gives for the whole output, never showing half a character."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdpd.model.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    IncrementalDetokenizer,
    Tokenizer,
    load_tokenizer,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # see test_model.py
from tests.model_factory import BPE_CORPUS, make_bpe_tokenizer

BYTE = ByteTokenizer(384)
EXAMPLES = settings(max_examples=150, deadline=None, database=None)   # no .hypothesis dir
# Characters of 1, 2, 3 and 4 UTF-8 bytes, so byte tokens split characters in every way.
ALPHABET = "ab cz.,\n" + "éüßç" + "你好世界€" + "🙂🚀"


class _HFAdapter(Tokenizer):
    """A bare ``tokenizers.Tokenizer`` seen through the ``Tokenizer`` interface."""

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.bos_token_id, self.eos_token_ids, self.all_special_ids = None, (), ()

    def encode(self, text):
        return self._tok.encode(text).ids

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


@functools.cache
def byte_level_bpe() -> _HFAdapter:
    return _HFAdapter(make_bpe_tokenizer(400))


@functools.cache
def byte_fallback_metaspace() -> _HFAdapter:
    """SentencePiece-style: Metaspace, single characters, <0xNN> byte fallback for the rest."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in "▁abcdefghijklmnopqrstuvwxyzTPF,.éü":
        vocab.setdefault(ch, len(vocab))
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens(["<s>", "</s>"])
    return _HFAdapter(tok)


def stream(tokenizer: Tokenizer, prompt: list[int], output: list[int], cuts: list[int],
           skip_special_tokens: bool = True) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed ``output`` in chunks ending at ``cuts``; return the deltas (flush last)."""
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
    bounds = sorted({c for c in cuts if 0 < c < len(output)} | {len(output)})
    deltas, start = [], 0
    for end in bounds:
        deltas.append(detok.add(output[start:end]))
        start = end
    deltas.append(detok.flush())
    return deltas, detok


# -- ByteTokenizer ------------------------------------------------------------------------------

def test_byte_tokenizer_layout():
    assert BYTE.encode("hé") == [256, 104, 0xC3, 0xA9]
    assert BYTE.bos_token_id == 256 and BYTE.eos_token_ids == (257,)
    assert BYTE.vocab_size == 384 and BYTE.all_special_ids == tuple(range(256, 384))
    assert BYTE.decode([256, 104, 105, 257]) == "hi"
    assert BYTE.decode([256, 104, 105, 257, 258, 300], skip_special_tokens=False) == \
        "<bos>hi<eos><pad><extra_41>"
    assert BYTE.decode([0xE2, 0x82]) == "\ufffd"            # incomplete UTF-8 is replaced
    with pytest.raises(ValueError, match="token id 384"):
        BYTE.decode([384])
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(100)


@EXAMPLES
@given(st.text(alphabet=ALPHABET, max_size=30))
def test_byte_tokenizer_round_trip(text):
    assert BYTE.decode(BYTE.encode(text)) == text


# -- IncrementalDetokenizer ---------------------------------------------------------------------

def test_incomplete_characters_are_held_back():
    detok = IncrementalDetokenizer(BYTE, BYTE.encode("price: "))
    assert [detok.add([b]) for b in "€5".encode()] == ["", "", "€", "5"]
    assert detok.text == "€5" and detok.flush() == ""


def test_flush_releases_an_invalid_tail():
    detok = IncrementalDetokenizer(BYTE, [])
    assert detok.add([ord("a"), 0xE2, 0x82]) == ""       # the whole step waits
    assert detok.flush() == "a\ufffd"
    assert detok.text == "a\ufffd" == BYTE.decode([ord("a"), 0xE2, 0x82])


def test_only_special_tokens_give_no_text_until_bytes_arrive():
    detok = IncrementalDetokenizer(BYTE, [256])
    assert detok.add([258, 300]) == ""
    assert detok.add([ord("x")]) == "x"
    detok = IncrementalDetokenizer(BYTE, [256], skip_special_tokens=False)
    assert detok.add([258, ord("x")]) == "<pad>x"


# Output token streams: UTF-8 bytes of text (multi-byte characters), raw bytes (often invalid
# UTF-8) and special tokens, in any order.
_byte_pieces = st.one_of(
    st.text(alphabet=ALPHABET, min_size=1, max_size=4).map(lambda s: list(s.encode())),
    st.lists(st.integers(0, 255), min_size=1, max_size=3),
    st.lists(st.integers(256, 383), min_size=1, max_size=2),
)
_byte_output = st.lists(_byte_pieces, max_size=12).map(lambda ps: [t for p in ps for t in p])
_byte_prompt = st.one_of(st.text(alphabet=ALPHABET, max_size=8).map(BYTE.encode),
                         st.lists(st.integers(0, 383), max_size=8))
_cuts = st.lists(st.integers(0, 60), max_size=20)


@EXAMPLES
@given(_byte_prompt, _byte_output, _cuts, st.booleans())
def test_byte_deltas_concatenate_to_decode(prompt, output, cuts, skip):
    deltas, detok = stream(BYTE, prompt, output, cuts, skip)
    assert "".join(deltas) == BYTE.decode(output, skip_special_tokens=skip) == detok.text
    assert detok.num_output_tokens == len(output)


@EXAMPLES
@given(st.text(alphabet=ALPHABET, max_size=8), st.text(alphabet=ALPHABET, max_size=20), _cuts)
def test_valid_text_never_shows_a_partial_character(prompt, text, cuts):
    deltas, _ = stream(BYTE, BYTE.encode(prompt), list(text.encode()), cuts)
    assert "\ufffd" not in "".join(deltas) and deltas[-1] == ""
    assert "".join(deltas) == text


@EXAMPLES
@given(st.text(alphabet=ALPHABET, max_size=8), st.text(alphabet=ALPHABET, max_size=30), _cuts)
def test_byte_level_bpe_text_deltas(prompt, text, cuts):
    tok = byte_level_bpe()
    output = tok.encode(text)
    deltas, _ = stream(tok, tok.encode(prompt), output, cuts)
    assert "".join(deltas) == tok.decode(output) == text
    assert deltas[-1] == ""                       # nothing held back at the end of valid text


@EXAMPLES
@given(st.lists(st.integers(0, 399), max_size=8), st.lists(st.integers(0, 399), max_size=30),
       _cuts, st.booleans())
def test_byte_level_bpe_random_ids(prompt, output, cuts, skip):
    # Random ids split characters and produce invalid UTF-8; still exactly decode().
    tok = byte_level_bpe()
    deltas, _ = stream(tok, prompt, output, cuts, skip)
    assert "".join(deltas) == tok.decode(output, skip_special_tokens=skip)


@EXAMPLES
@given(st.lists(st.text(alphabet=ALPHABET + "TPF", max_size=6), max_size=5), _cuts)
def test_byte_fallback_text_without_prompt(pieces, cuts):
    # Text outside the vocabulary is spelled with <0xNN> byte tokens. (Only valid text: the
    # ByteFallback decoder turns a whole run of byte tokens into U+FFFD when any byte of the run
    # is invalid, which no incremental decoder can reproduce from a prefix.)
    tok = byte_fallback_metaspace()
    output = [t for piece in pieces for t in tok.encode(piece)]
    deltas, _ = stream(tok, [], output, cuts)
    assert "".join(deltas) == tok.decode(output)
    assert "\ufffd" not in "".join(deltas)


def test_byte_fallback_characters_are_held_until_complete():
    tok = byte_fallback_metaspace()
    output = tok.encode("a你")                 # ▁ a <0xE4> <0xBD> <0xA0>
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.add([t]) for t in output] == ["", "a", "", "", "你"]


def test_first_token_continues_the_prompt():
    # With prompt context the first output token keeps the space that a SentencePiece decode
    # of the output alone would strip (vLLM and OpenAI completions behave so).
    tok = byte_fallback_metaspace()
    prompt, output = tok.encode("Paris is"), tok.encode("fun")
    assert tok.decode(output) == "fun"
    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.add(output) == " fun"


def test_window_stays_small():
    calls: list[int] = []

    class Counting(ByteTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    detok = IncrementalDetokenizer(Counting(384), BYTE.encode("prompt"))
    for b in ("x" * 300 + "€" * 100).encode():
        detok.add([b])
    assert detok.text == "x" * 300 + "€" * 100
    assert max(calls) <= 6


# -- HFTokenizer and load_tokenizer --------------------------------------------------------------

def _write_tokenizer_dir(path: Path, tokenizer_config: dict | None, bos_in_post: bool = False):
    from tokenizers import processors

    tok = make_bpe_tokenizer(400)
    if bos_in_post:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def test_hf_tokenizer_settings(tmp_path):
    cfg = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True,
           "chat_template": "{{ messages }}"}
    tok = load_tokenizer(_write_tokenizer_dir(tmp_path / "a", cfg), eos_token_ids=(7,))
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (7, 2)
    assert tok.all_special_ids == (0, 1, 2) and tok.vocab_size == 400
    assert tok.chat_template == "{{ messages }}"
    ids = tok.encode(BPE_CORPUS[0])
    assert ids[0] == 1 and ids[1] != 1
    assert tok.decode(ids) == BPE_CORPUS[0]
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + BPE_CORPUS[0]


def test_bos_from_post_processor_is_not_doubled(tmp_path):
    path = _write_tokenizer_dir(tmp_path / "b", {"bos_token": "<s>", "add_bos_token": True},
                                bos_in_post=True)
    ids = load_tokenizer(path).encode("hello")
    assert ids[0] == 1 and ids.count(1) == 1


def test_no_bos_unless_asked(tmp_path):
    path = _write_tokenizer_dir(tmp_path / "c", None)
    tok = load_tokenizer(path, eos_token_ids=(2,), bos_token_id=1)
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.encode("hello")[0] != 1
    assert tok.chat_template is None


def test_load_tokenizer_without_files_is_none(tmp_path):
    assert load_tokenizer(tmp_path) is None


def test_byte_tokenizer_marker(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "FdpdByteTokenizer", "vocab_size": 300}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 300
