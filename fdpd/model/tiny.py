"""The built-in ``tiny`` model: a small Llama with seeded random weights and a byte tokenizer, so
that everything runs on a fresh machine with no download.

Its outputs are meaningless text but fully deterministic: the weights come from a fixed-seed
``torch.Generator`` (the same tensors on every call and every machine with this torch version),
scaled so that next-token distributions are peaked and greedy decoding is rarely a near-tie.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from fdpd.model.config import ModelConfig
from fdpd.model.tokenizer import BYTE_TOKENIZER_CLASS, ByteTokenizer

TINY_SEED = 20240611
TINY_CONFIG = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=384,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    attention_bias=False,
    torch_dtype="float32",
    bos_token_id=ByteTokenizer.BOS,
    eos_token_ids=(ByteTokenizer.EOS,),
    name="tiny",
)
# Logits are scaled up from unit variance: with ~400 candidates a unit-variance logit vector
# puts the top two within ~0.3 of each other; x4 makes the top choice stand out.
_LM_HEAD_GAIN = 4.0


def seeded_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights for ``cfg`` under Hugging Face names, a pure function of
    ``(cfg shapes, seed)``. Linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights 1,
    q/k/v biases (when ``cfg.attention_bias``) ~ N(0, 0.5^2). ``lm_head.weight`` is left out when
    the embeddings are tied."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    def linear(out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
        return normal(out_features, in_features, std=gain / math.sqrt(in_features))

    h, i = cfg.hidden_size, cfg.intermediate_size
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(cfg.vocab_size, h, std=1.0)}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        sd[p + "input_layernorm.weight"] = torch.ones(h)
        sd[p + "self_attn.q_proj.weight"] = linear(cfg.q_size, h)
        sd[p + "self_attn.k_proj.weight"] = linear(cfg.kv_size, h)
        sd[p + "self_attn.v_proj.weight"] = linear(cfg.kv_size, h)
        if cfg.attention_bias:
            sd[p + "self_attn.q_proj.bias"] = normal(cfg.q_size, std=0.5)
            sd[p + "self_attn.k_proj.bias"] = normal(cfg.kv_size, std=0.5)
            sd[p + "self_attn.v_proj.bias"] = normal(cfg.kv_size, std=0.5)
        sd[p + "self_attn.o_proj.weight"] = linear(h, cfg.q_size)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h)
        sd[p + "mlp.gate_proj.weight"] = linear(i, h)
        sd[p + "mlp.up_proj.weight"] = linear(i, h)
        sd[p + "mlp.down_proj.weight"] = linear(h, i)
    sd["model.norm.weight"] = torch.ones(h)
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = linear(cfg.vocab_size, h, gain=_LM_HEAD_GAIN)
    return sd


def tiny_state_dict() -> dict[str, torch.Tensor]:
    """The tiny model's weights (float32, Hugging Face names); equal tensors on every call."""
    return seeded_state_dict(TINY_CONFIG, TINY_SEED)


def tiny_tokenizer() -> ByteTokenizer:
    return ByteTokenizer(TINY_CONFIG.vocab_size)


def export_tiny(directory: str | Path) -> Path:
    """Write the tiny model as a Hugging Face directory (config.json, model.safetensors,
    generation_config.json, tokenizer_config.json); ``load_model(directory)`` rebuilds it with
    its ``ByteTokenizer``, and ``transformers`` can load the weights."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TINY_CONFIG
    _write_json(out / "config.json", cfg.to_hf())
    save_file({k: v.contiguous() for k, v in tiny_state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "generation_config.json", {
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids),
        "pad_token_id": ByteTokenizer.PAD})
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": BYTE_TOKENIZER_CLASS, "vocab_size": cfg.vocab_size,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True})
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
