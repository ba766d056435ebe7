"""A byte-level BPE tokenizer trained on the spot for synthetic checkpoints, so a model directory
carries a real ``tokenizer.json`` that fdpd, ``transformers`` and vLLM all load the same way.

The corpus is pseudo-English generated from a seed (letter frequencies of English, words of 2-9
letters), which gives the trainer enough distinct pairs to reach a 32000-id vocabulary in a few
seconds. Training is deterministic for a given corpus, so the same seed gives the same file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")       # ids 0, 1, 2: the synthetic config's BOS/EOS
_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_WEIGHTS = (12, 9, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1)


def synthetic_corpus(seed: int, words: int = 60000, lines: int = 40000) -> list[str]:
    """Lines of 20 pseudo-words drawn from a lexicon of ``words`` entries."""
    rng = random.Random(seed)
    lexicon = ["".join(rng.choices(_LETTERS, _WEIGHTS, k=rng.randint(2, 9)))
               for _ in range(words)]
    return [" ".join(rng.choice(lexicon) for _ in range(20)) for _ in range(lines)]


def train_bpe_tokenizer(vocab_size: int, seed: int = 0):
    """A ``tokenizers.Tokenizer`` with exactly ``vocab_size`` ids (specials first), BOS added by
    its post-processor (so every loader that runs the post-processor agrees on it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size: a byte-level BPE needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} ids, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # A small vocabulary needs only a small corpus; a big one needs enough distinct pairs.
    scale = min(1.0, max(0.02, vocab_size / 32000))
    tok.train_from_iterator(synthetic_corpus(seed, int(60000 * scale), int(40000 * scale)),
                            trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"vocab_size: the synthetic corpus yields {tok.get_vocab_size()} ids, "
                         f"not {vocab_size}; choose a vocabulary of at most 32000")
    bos = SPECIAL_TOKENS[1]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 1)])
    return tok


def write_tokenizer(directory: str | Path, vocab_size: int, seed: int = 0) -> Path:
    """``tokenizer.json`` + ``tokenizer_config.json`` (a ``PreTrainedTokenizerFast``) in
    ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    train_bpe_tokenizer(vocab_size, seed).save(str(out / "tokenizer.json"))
    unk, bos, eos = SPECIAL_TOKENS
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "unk_token": unk, "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False,
    }, indent=2))
    return out
