"""Synthetic Hugging Face checkpoints: random weights in the exact directory layout that
``load_model``, ``ReferenceModel`` and ``transformers.AutoModelForCausalLM.from_pretrained`` all
read, written on the spot so benchmarks and tests need no download.

Weights come from ``fdpd.model.tiny.seeded_state_dict``: a pure function of the shapes and the
seed, scaled so that greedy decoding has clear winners (side-by-side comparisons of two engines
then agree token for token instead of diverging on float near-ties).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fdpd.model.config import ModelConfig
from fdpd.model.tiny import seeded_state_dict

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mistral": "MistralForCausalLM"}
BOS, EOS = 1, 2


def synthetic_config(arch: str = "llama", hidden: int = 256, layers: int = 4,
                     vocab: int = 32000, heads: int = 4, kv_heads: int | None = None,
                     intermediate: int | None = None, max_positions: int = 4096,
                     dtype: str = "float32", tie: bool = False,
                     **overrides: Any) -> ModelConfig:
    """The ``ModelConfig`` of a synthetic checkpoint. ``kv_heads`` defaults to ``heads // 2``
    (GQA), ``intermediate`` to ``3 * hidden``; Qwen2 gets q/k/v biases. ``overrides`` are further
    ``ModelConfig`` fields (e.g. ``sliding_window=64``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if hidden % heads:
        raise ValueError(f"hidden: {hidden} is not a multiple of heads={heads}")
    kv = kv_heads if kv_heads is not None else max(1, heads // 2)
    cfg = ModelConfig(
        architecture=ARCHITECTURES[arch], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=intermediate or 3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
        rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, attention_bias=arch == "qwen2", torch_dtype=dtype,
        bos_token_id=BOS, eos_token_ids=(EOS,), name=f"synthetic-{arch}")
    return dataclasses.replace(cfg, **overrides)


def write_checkpoint(directory: str | Path, cfg: ModelConfig, seed: int = 0,
                     shards: int = 1) -> Path:
    """Write ``cfg`` with seeded weights (stored in ``cfg.torch_dtype``) to ``directory``:
    ``config.json`` plus one ``model.safetensors``, or ``shards`` files and an index."""
    if shards < 1:
        raise ValueError(f"shards: must be >= 1, got {shards}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2, default=list))
    dtype = getattr(torch, cfg.torch_dtype)
    weights = {k: v.to(dtype).contiguous() for k, v in seeded_state_dict(cfg, seed).items()}
    if shards == 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    names = list(weights)
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[i * per_shard:(i + 1) * per_shard]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def write_synthetic_checkpoint(directory: str | Path, arch: str = "llama", hidden: int = 256,
                               layers: int = 4, vocab: int = 32000, seed: int = 0,
                               **kwargs: Any) -> Path:
    """``synthetic_config(arch, hidden, layers, vocab, **kwargs)`` written by
    ``write_checkpoint``. Returns the directory."""
    return write_checkpoint(directory, synthetic_config(arch, hidden, layers, vocab, **kwargs),
                            seed=seed)


def write_model_dir(directory: str | Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """A complete model directory: the checkpoint of ``cfg`` plus a BPE tokenizer of exactly
    ``cfg.vocab_size`` ids trained for it, and a ``generation_config.json``: what fdpd, vLLM and
    ``transformers`` all load (``fdpd model synth``)."""
    from fdpd.model.synthetic_tokenizer import write_tokenizer

    out = write_checkpoint(directory, cfg, seed=seed)
    write_tokenizer(out, cfg.vocab_size, seed=seed)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": EOS, "do_sample": False}, indent=2))
    return out
