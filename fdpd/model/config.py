"""The shape of a Llama-family decoder, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from fdpd.config import DTYPES, ConfigError

# Architectures whose forward is exactly the Llama block (RMSNorm, RoPE, GQA, SwiGLU).
# Qwen2 adds a bias on q/k/v; Mistral adds an optional sliding window.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    name: str = ""

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def fingerprint(self, dtype: str, block_size: int) -> bytes:
        """Identity of the KV cache this model produces: seeds the prefix hashes and tags stored
        objects, so KV from another model, dtype or block layout can never be mistaken for ours."""
        blob = json.dumps({"model": asdict(self), "dtype": dtype, "block_size": block_size},
                          sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).digest()

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], name: str = "") -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError("architectures", f"unsupported architecture {arch!r}; fdpd "
                              f"supports {', '.join(SUPPORTED_ARCHITECTURES)}")

        def need(key: str) -> Any:
            if key not in cfg or cfg[key] is None:
                raise ConfigError(key, f"missing from config.json of {name or 'model'}")
            return cfg[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ConfigError("num_key_value_heads", f"{kv_heads} does not divide "
                              f"num_attention_heads={heads}")
        if head_dim % 2:
            raise ConfigError("head_dim", f"must be even for RoPE, got {head_dim}")
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_SCALING:
                raise ConfigError("rope_scaling", f"rope type {kind!r} is not supported "
                                  f"(supported: {', '.join(SUPPORTED_ROPE_SCALING)})")
            rope_scaling = tuple(sorted({**rope_scaling, "rope_type": kind}.items()))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
        if dtype not in DTYPES:
            dtype = "float32"
        sliding = cfg.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
            sliding = None
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            torch_dtype=dtype,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=int(sliding) if sliding else None,
            rope_scaling=rope_scaling or None,
            name=name,
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` a Hugging Face loader expects for this model."""
        cfg: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                           "MistralForCausalLM": "mistral"}[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
        }
        if self.architecture == "LlamaForCausalLM":
            cfg["attention_bias"] = self.attention_bias
            cfg["mlp_bias"] = False
        if self.architecture == "MistralForCausalLM":
            cfg["sliding_window"] = self.sliding_window
        if self.architecture == "Qwen2ForCausalLM":
            cfg["use_sliding_window"] = False
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        return cfg
