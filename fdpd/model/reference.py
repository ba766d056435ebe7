"""A dense reference of the Llama family (Llama, Qwen2, Mistral) for exactness tests.

Deliberately plain and written independently of ``llama.py``/``attention.py``: Hugging Face
tensor names used as they are (separate q/k/v and gate/up, q/k/v biases when present), full causal
attention over the whole sequence, no KV cache, no batching, and ``greedy`` recomputes the whole
sequence for every token. Its math follows ``transformers``: RMSNorm in float32 then cast back,
rotate-half RoPE with cos/sin computed in float32, softmax in float32, SiLU-gated MLP, sliding
window as in Mistral (a key is visible while ``query_pos - key_pos < sliding_window``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fdpd.model.config import ModelConfig


def reference_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2], float32, with linear or llama3 scaling."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    scaling = cfg.rope_scaling_dict() or {}
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"rope_scaling: unsupported rope type {kind!r}")
    # llama3: wavelengths longer than original_len/low_freq_factor are slowed down by `factor`,
    # shorter than original_len/high_freq_factor are kept, and the band between interpolates.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original_len = float(scaling["original_max_position_embeddings"])
    out = inv_freq.clone()
    for j, freq in enumerate(inv_freq.tolist()):
        wavelen = 2 * math.pi / freq
        if wavelen > original_len / low:
            out[j] = inv_freq[j] / factor
        elif wavelen >= original_len / high:
            smooth = (original_len / wavelen - low) / (high - low)
            out[j] = (1 - smooth) * inv_freq[j] / factor + smooth * inv_freq[j]
    return out


class ReferenceModel:
    """Dense forward of one sequence. ``state_dict`` holds Hugging Face names; computation runs
    in the dtype of ``model.embed_tokens.weight``, logits are returned as float32."""

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor]):
        self.config = config
        self.dtype = self._require(state_dict, "model.embed_tokens.weight").dtype
        self.w = {name: t.detach().to(self.dtype) for name, t in state_dict.items()}
        self._require(self.w, "model.norm.weight")
        if not config.tie_word_embeddings:
            self._require(self.w, "lm_head.weight")
        for layer in range(config.num_hidden_layers):
            for part in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
                         "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                self._require(self.w, f"model.layers.{layer}.{part}.weight")

    @staticmethod
    def _require(weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name not in weights:
            raise ValueError(f"state_dict is missing {name!r}")
        return weights[name]

    def _rms_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return self.w[name] * x32.to(x.dtype)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        bias = self.w.get(name + ".bias")
        return F.linear(x, self.w[name + ".weight"], bias)

    def _rope(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(num_tokens, dtype=torch.float32)
        freqs = positions[:, None] * reference_inv_freq(self.config)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)                   # [T, head_dim]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _visible(self, num_tokens: int) -> torch.Tensor:
        q = torch.arange(num_tokens)[:, None]
        k = torch.arange(num_tokens)[None, :]
        visible = k <= q
        if self.config.sliding_window is not None:
            visible &= (q - k) < self.config.sliding_window
        return visible                                            # [T, T]

    def _attention(self, x: torch.Tensor, layer: int, cos: torch.Tensor, sin: torch.Tensor,
                   visible: torch.Tensor) -> torch.Tensor:
        c = self.config
        p = f"model.layers.{layer}.self_attn."
        t, d = x.shape[0], c.head_dim
        q = self._linear(x, p + "q_proj").view(t, c.num_attention_heads, d).transpose(0, 1)
        k = self._linear(x, p + "k_proj").view(t, c.num_key_value_heads, d).transpose(0, 1)
        v = self._linear(x, p + "v_proj").view(t, c.num_key_value_heads, d).transpose(0, 1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        groups = c.num_attention_heads // c.num_key_value_heads
        k = k.repeat_interleave(groups, dim=0)                    # [Hq, T, D]
        v = v.repeat_interleave(groups, dim=0)
        scores = (q @ k.transpose(1, 2)) * (d ** -0.5)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(self.dtype)
        out = (probs @ v).transpose(0, 1).reshape(t, c.num_attention_heads * d)
        return self._linear(out, p + "o_proj")

    def _mlp(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        p = f"model.layers.{layer}.mlp."
        gated = F.silu(self._linear(x, p + "gate_proj")) * self._linear(x, p + "up_proj")
        return self._linear(gated, p + "down_proj")

    @torch.no_grad()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits [T, vocab] (float32) of every position of ``token_ids``."""
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("token_ids: must not be empty")
        cos, sin = self._rope(ids.numel())
        visible = self._visible(ids.numel())
        x = self.w["model.embed_tokens.weight"][ids]
        for layer in range(self.config.num_hidden_layers):
            p = f"model.layers.{layer}."
            x = x + self._attention(self._rms_norm(x, p + "input_layernorm.weight"), layer,
                                    cos, sin, visible)
            x = x + self._mlp(self._rms_norm(x, p + "post_attention_layernorm.weight"), layer)
        x = self._rms_norm(x, "model.norm.weight")
        head = self.w.get("lm_head.weight") if not self.config.tie_word_embeddings else None
        if head is None:
            head = self.w["model.embed_tokens.weight"]
        return F.linear(x, head).float()

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int,
               eos_token_ids: Sequence[int] = (), ignore_eos: bool = True,
               ) -> tuple[list[int], torch.Tensor]:
        """Greedy decoding, recomputing the whole sequence each step. Returns the new tokens
        (prompt excluded) and the logits [vocab] the last of them was chosen from."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        tokens = list(prompt_ids)
        out: list[int] = []
        last = torch.empty(0)
        for _ in range(max_new_tokens):
            last = self.logits(tokens)[-1]
            token = int(torch.argmax(last))
            tokens.append(token)
            out.append(token)
            if not ignore_eos and token in eos_token_ids:
                break
        return out, last


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
