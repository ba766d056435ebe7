"""Random-weight Hugging Face checkpoints for tests (no download).

``make_checkpoint`` writes a directory that ``fdpd.model.loader.load_model``,
``fdpd.model.reference.ReferenceModel`` (via ``checkpoint_state_dict``) and
``transformers.AutoModelForCausalLM.from_pretrained`` all load, so exactness tests can compare
the three. The small test shapes live here; the writing (seeded weights, shards, index) is
``fdpd.model.synthetic.write_checkpoint``.

Typical use::

    path = make_checkpoint(tmp_path, "qwen2", tie=True)
    loaded = load_model(str(path))
    ref = ReferenceModel(loaded.config, checkpoint_state_dict(path))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from fdpd.model.config import ModelConfig
from fdpd.model.loader import iter_safetensors
from fdpd.model.synthetic import ARCHITECTURES, synthetic_config, write_checkpoint
# Sentences the test BPE tokenizer is trained on: ASCII, accents, CJK and emoji, so that some
# characters span several byte-level tokens.
BPE_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Prefill and decode run on different machines; the KV cache moves between them.",
    "Grüße aus Köln! Ça va très bien, merci.",
    "你好，世界。分离式推理把预填充和解码分开。",
    "Emoji: 🙂 🚀 ✨ and symbols € £ ¥ ©.",
)


def base_config(arch: str, dtype: str = "float32", tie: bool = False,
                **overrides: Any) -> ModelConfig:
    """The small default shape for ``arch``: vocab 512, hidden 64, 2 layers, 4 heads, 2 KV
    heads, head_dim 16, max 512 positions; Qwen2 gets q/k/v biases. ``overrides`` are
    ``ModelConfig`` fields (e.g. ``head_dim=32``, ``num_key_value_heads=1``,
    ``sliding_window=16``, ``rope_scaling={"rope_type": "llama3", ...}`` as a dict)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a ModelConfig field")
    if isinstance(overrides.get("rope_scaling"), dict):
        overrides["rope_scaling"] = tuple(sorted(overrides["rope_scaling"].items()))
    return synthetic_config(arch, hidden=64, layers=2, vocab=512, heads=4, kv_heads=2,
                            intermediate=128, max_positions=512, dtype=dtype, tie=tie,
                            **{"name": f"test-{arch}", **overrides})


def make_checkpoint(tmp_dir: str | Path, arch: str, dtype: str = "float32", shards: int = 1,
                    tie: bool = False, seed: int = 0, tokenizer: bool = False,
                    **overrides: Any) -> Path:
    """Write a random-weight checkpoint under ``tmp_dir`` and return its directory.

    ``arch`` is "llama", "qwen2" or "mistral"; ``dtype`` the stored dtype (float32, bfloat16,
    float16, also written as ``torch_dtype``); ``shards`` > 1 writes
    ``model-0000i-of-0000n.safetensors`` files plus ``model.safetensors.index.json``; ``tie``
    ties the LM head to the embeddings (no ``lm_head.weight`` stored); ``tokenizer`` adds a
    byte-level BPE ``tokenizer.json`` (see ``make_bpe_tokenizer``) with ``<s>``=1, ``</s>``=2.
    ``overrides`` are ``ModelConfig`` fields, see ``base_config``. The directory name encodes
    the arguments, so several checkpoints can share one ``tmp_dir``.
    """
    cfg = base_config(arch, dtype=dtype, tie=tie, **overrides)
    label = hashlib.sha256(repr(sorted(overrides.items())).encode()).hexdigest()[:8]
    name = f"{arch}-{dtype}-s{shards}-t{int(tie)}-seed{seed}-tok{int(tokenizer)}-{label}"
    out = Path(tmp_dir) / name
    write_checkpoint(out, cfg, seed=seed, shards=shards)
    if tokenizer:
        make_bpe_tokenizer(min(cfg.vocab_size, 400)).save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    return out


def checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory written by ``make_checkpoint`` (any sharding)."""
    return dict(iter_safetensors(Path(path)))


def make_bpe_tokenizer(vocab_size: int = 400):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``BPE_CORPUS`` with special tokens
    ``<unk>``=0, ``<s>``=1, ``</s>``=2 (deterministic: the trainer is deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(BPE_CORPUS, trainer)
    return tok
