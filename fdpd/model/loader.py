"""Load a model: the built-in ``tiny`` or a local Hugging Face directory (``config.json`` plus
``*.safetensors``, single file or sharded with ``model.safetensors.index.json``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fdpd.config import DTYPES, ConfigError
from fdpd.model.config import ModelConfig
from fdpd.model.kernels import select_kernels
from fdpd.model.llama import LlamaForCausalLM, RotaryEmbedding
from fdpd.model.tiny import TINY_CONFIG, tiny_state_dict, tiny_tokenizer
from fdpd.model.tokenizer import Tokenizer, load_tokenizer

SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer | None
    dtype: str          # the dtype the weights were converted to: float32, bfloat16 or float16
    source: str         # "tiny" or the model directory as given
    kernels: str = "torch"   # the linear layers' GEMM backend (fdpd.model.kernels)


def load_model(model: str = "tiny", dtype: str = "auto", device: str = "cpu",
               max_positions: int | None = None, kernels: str = "auto") -> LoadedModel:
    """Build the model in eval mode on ``device``. ``dtype`` "auto" keeps the checkpoint's
    ``torch_dtype``; ``max_positions`` bounds the RoPE table (default: the model's
    ``max_position_embeddings``); ``kernels`` picks the linear layers' GEMM backend
    (``fdpd.model.kernels``: auto, native, onednn or torch)."""
    cfg, tokenizer = load_model_metadata(model)
    if model == "tiny":
        weights: Iterator[tuple[str, torch.Tensor]] = iter(tiny_state_dict().items())
    else:
        weights = iter_safetensors(Path(model))
    dtype_name = cfg.torch_dtype if dtype == "auto" else dtype
    if dtype_name not in DTYPES:
        raise ConfigError("dtype", f"must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    if max_positions is not None and max_positions < 1:
        raise ConfigError("max_positions", f"must be >= 1, got {max_positions}")
    net = _empty_model(cfg, getattr(torch, dtype_name), torch.device(device), max_positions)
    try:
        net.load_weights(weights)
    except ValueError as e:
        raise ValueError(f"model {model!r}: {e}") from e
    try:
        backend = select_kernels(net, kernels, torch.device(device), getattr(torch, dtype_name))
    except ValueError as e:
        raise ConfigError("kernels", str(e).removeprefix("kernels: ")) from e
    return LoadedModel(model=net.eval(), config=cfg, tokenizer=tokenizer, dtype=dtype_name,
                       source=model, kernels=backend)


def load_model_metadata(model: str) -> tuple[ModelConfig, Tokenizer | None]:
    """The model's config and tokenizer, without weights (what a router needs)."""
    if model == "tiny":
        return TINY_CONFIG, tiny_tokenizer()
    directory = Path(model)
    if not (directory / "config.json").is_file():
        raise ValueError(f"model {model!r} is neither the built-in 'tiny' nor a directory "
                         f"containing config.json")
    cfg = read_model_config(directory)
    return cfg, load_tokenizer(directory, cfg.eos_token_ids, cfg.bos_token_id)


def model_fingerprint(loaded: LoadedModel, block_size: int) -> bytes:
    """Identity of the KV cache ``loaded`` produces with ``block_size`` (seeds prefix hashes)."""
    return loaded.config.fingerprint(loaded.dtype, block_size)


def read_model_config(directory: Path) -> ModelConfig:
    """``config.json`` of ``directory``, with the EOS ids of ``generation_config.json`` added
    (chat models often list their end-of-turn tokens only there)."""
    with open(directory / "config.json", encoding="utf-8") as f:
        cfg = ModelConfig.from_hf(json.load(f), name=directory.resolve().name)
    gen_path = directory / "generation_config.json"
    if gen_path.is_file():
        with open(gen_path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        merged = tuple(dict.fromkeys([*cfg.eos_token_ids, *(int(i) for i in extra)]))
        if merged != cfg.eos_token_ids:
            cfg = replace(cfg, eos_token_ids=merged)
    return cfg


def iter_safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of the checkpoint, one file open at a time."""
    from safetensors import safe_open

    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model {str(directory)!r}: no *.safetensors files (only safetensors "
                         f"checkpoints are supported)")
    for path in files:
        if not path.is_file():
            raise ValueError(f"model {str(directory)!r}: {SAFETENSORS_INDEX} names {path.name}, "
                             f"which does not exist")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = f.keys()      # a safe_open handle is not iterable itself
            for name in names:
                yield name, f.get_tensor(name)


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 max_positions: int | None) -> LlamaForCausalLM:
    # Built on the meta device so no weight is initialised only to be overwritten by the load.
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg, max_positions)
    net = net.to(dtype).to_empty(device=device)
    # to_empty leaves the RoPE tables (non-persistent buffers) uninitialised and unties shared
    # parameters: rebuild both for real.
    net.model.rotary = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings).to(device)
    if cfg.tie_word_embeddings:
        net.lm_head.weight = net.model.embed_tokens.weight
    return net
