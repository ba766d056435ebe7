"""The paged model (``llama.py`` via ``load_model``) against the dense reference and against
``transformers``, on random-weight checkpoints of every supported architecture."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fdpd.config import ConfigError
from fdpd.model.attention import AttentionMetadata, DecodeGroup, PrefillSpan
from fdpd.model.loader import LoadedModel, load_model, model_fingerprint
from fdpd.model.reference import ReferenceModel
from fdpd.model.tiny import TINY_CONFIG, export_tiny, tiny_state_dict
from fdpd.model.tokenizer import ByteTokenizer, HFTokenizer

# The repository root, so that the shared ``tests.model_factory`` imports under plain ``pytest``
# (only ``fdpd`` is installed). Drop this once pyproject sets ``pythonpath = ["."]``.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.model_factory import checkpoint_state_dict, make_checkpoint

PROMPT = [(7 * i + 3) % 380 + 3 for i in range(40)]
TOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "llama": {"arch": "llama"},
    "qwen2_tied_bias": {"arch": "qwen2", "tie": True},
    "mistral": {"arch": "mistral"},
    "mistral_window16": {"arch": "mistral", "sliding_window": 16},
    "llama3_rope": {"arch": "llama", "rope_scaling": LLAMA3_ROPE},
    "linear_rope": {"arch": "llama", "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "sharded_hd32_kv1": {"arch": "llama", "shards": 3, "head_dim": 32, "num_key_value_heads": 1,
                         "num_hidden_layers": 3},
}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


def _kv_cache(loaded: LoadedModel, num_tokens: int, block_size: int = 16) -> torch.Tensor:
    c = loaded.config
    blocks = -(-num_tokens // block_size)
    return torch.zeros(blocks, c.num_hidden_layers, 2, block_size, c.num_key_value_heads,
                       c.head_dim, dtype=getattr(torch, loaded.dtype))


def _window_mask(cfg, start: int, total: int) -> torch.Tensor | None:
    """[new, total] visibility for queries at positions start..total-1 (None: plain causal)."""
    if cfg.sliding_window is None and start == 0:
        return None
    q = torch.arange(start, total)[:, None]
    k = torch.arange(total)[None, :]
    mask = k <= q
    if cfg.sliding_window is not None:
        mask &= (q - k) < cfg.sliding_window
    return mask


def paged_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """One prefill of ``ids`` through the paged model; blocks 0..n-1 in order."""
    t = len(ids)
    cache = _kv_cache(loaded, t)
    span = PrefillSpan(token_start=0, num_new=t, start=0, key_blocks=None,
                       mask=_window_mask(loaded.config, 0, t))
    meta = AttentionMetadata.from_slots(torch.arange(t), cache.shape[3], [span], [])
    hidden = loaded.model(torch.tensor(ids), torch.arange(t), cache, meta)
    return loaded.model.compute_logits(hidden)


def paged_decode_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Prefill ``ids[:-1]``, then one decode step for ``ids[-1]``; its logits [vocab]."""
    t = len(ids)
    cache = _kv_cache(loaded, t)
    span = PrefillSpan(token_start=0, num_new=t - 1, start=0, key_blocks=None, mask=None)
    meta = AttentionMetadata.from_slots(torch.arange(t - 1), cache.shape[3], [span], [])
    loaded.model(torch.tensor(ids[:-1]), torch.arange(t - 1), cache, meta)
    # One decode group: blocks 0..W-1 hold positions 0..t-1 (slot = position).
    bs = cache.shape[3]
    width = -(-t // bs)
    mask = (torch.arange(width * bs) < t)[None, None, None, :]
    group = DecodeGroup(torch.tensor([0]), torch.arange(width)[None], mask, run=(0, 1))
    meta = AttentionMetadata.from_slots(torch.tensor([t - 1]), bs, [], [group])
    hidden = loaded.model(torch.tensor(ids[-1:]), torch.tensor([t - 1]), cache, meta)
    return loaded.model.compute_logits(hidden)[0]


def hf_logits(path, ids: list[int]) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("case", list(CASES))
def test_paged_reference_and_transformers_agree(ckpt_dir, case):
    path = make_checkpoint(ckpt_dir, **CASES[case])
    loaded = load_model(str(path))
    ref = ReferenceModel(loaded.config, checkpoint_state_dict(path)).logits(PROMPT)
    ours = paged_logits(loaded, PROMPT)
    theirs = hf_logits(path, PROMPT)
    assert ours.shape == ref.shape == theirs.shape == (len(PROMPT), loaded.config.vocab_size)
    assert (ours - ref).abs().max().item() < TOL
    assert (theirs - ref).abs().max().item() < TOL


@pytest.mark.parametrize("case,disable", [
    ("mistral_window16", {"sliding_window": None}),
    ("llama3_rope", {"rope_scaling": None}),
    ("linear_rope", {"rope_scaling": None}),
    ("qwen2_tied_bias", {"attention_bias": False}),
])
def test_each_feature_changes_the_logits(ckpt_dir, case, disable):
    # Guards the agreement test: the feature must be one that all three actually apply.
    path = make_checkpoint(ckpt_dir, **CASES[case])
    loaded = load_model(str(path))
    state = checkpoint_state_dict(path)
    if disable.get("attention_bias") is False:
        state = {k: v for k, v in state.items() if not k.endswith(".bias")}
    with_feature = ReferenceModel(loaded.config, checkpoint_state_dict(path)).logits(PROMPT)
    without = ReferenceModel(dataclasses.replace(loaded.config, **disable), state).logits(PROMPT)
    assert (with_feature - without).abs().max().item() > 1e-2


@pytest.mark.parametrize("case", ["llama", "qwen2_tied_bias", "sharded_hd32_kv1"])
def test_decode_step_matches_reference(ckpt_dir, case):
    path = make_checkpoint(ckpt_dir, **CASES[case])
    loaded = load_model(str(path))
    ref = ReferenceModel(loaded.config, checkpoint_state_dict(path)).logits(PROMPT)[-1]
    assert (paged_decode_logits(loaded, PROMPT) - ref).abs().max().item() < TOL


def test_tied_embeddings_share_one_tensor(ckpt_dir):
    # The plain torch kernels keep the tie; prepacked ones hold a packed copy (test_kernels.py).
    loaded = load_model(str(make_checkpoint(ckpt_dir, **CASES["qwen2_tied_bias"])),
                        kernels="torch")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load(ckpt_dir, dtype):
    path = make_checkpoint(ckpt_dir, "llama", dtype=dtype)
    loaded = load_model(str(path))
    assert loaded.dtype == dtype
    assert all(p.dtype == getattr(torch, dtype) for p in loaded.model.parameters())
    logits = paged_logits(loaded, PROMPT)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()

    as_f32 = load_model(str(path), dtype="float32")
    assert as_f32.dtype == "float32"
    assert all(p.dtype == torch.float32 for p in as_f32.model.parameters())
    ref = ReferenceModel(as_f32.config, checkpoint_state_dict(path))    # runs in `dtype`
    assert ref.dtype == getattr(torch, dtype)
    assert torch.isfinite(ref.logits(PROMPT)).all()
    assert (paged_logits(as_f32, PROMPT) - logits).abs().max().item() < 1.0


def test_explicit_dtype_converts_tiny():
    loaded = load_model("tiny", dtype="bfloat16")
    assert loaded.dtype == "bfloat16"
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(paged_logits(loaded, PROMPT)).all()


def test_max_positions_bounds_the_rope_table():
    loaded = load_model("tiny", max_positions=64)
    assert loaded.model.model.rotary.cos.shape == (64, TINY_CONFIG.head_dim)


def test_unknown_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither the built-in 'tiny' nor a directory"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="containing config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture_names_the_field(ckpt_dir, tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel") as err:
        load_model(str(path))
    assert err.value.field == "architectures"


def test_bad_dtype_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        load_model("tiny", dtype="int8")
    assert err.value.field == "dtype"


def test_missing_and_unknown_tensors_are_named(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    weights = load_file(str(path / "model.safetensors"))
    missing = dict(weights)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing 1 tensors.*model.layers.1.mlp.up_proj.weight"):
        load_model(str(path))
    save_file({**weights, "model.layers.0.extra.weight": torch.zeros(2)},
              str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.0.extra.weight"):
        load_model(str(path))


def test_missing_shard_and_missing_weights_are_clear(tmp_path):
    path = make_checkpoint(tmp_path, "llama", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        load_model(str(path))
    for file in path.glob("*.safetensors*"):
        file.unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_model(str(path))


def test_tokenizer_is_loaded_when_present(tmp_path):
    bare = load_model(str(make_checkpoint(tmp_path, "llama")))
    assert bare.tokenizer is None
    with_tok = load_model(str(make_checkpoint(tmp_path, "llama", tokenizer=True)))
    assert isinstance(with_tok.tokenizer, HFTokenizer)
    ids = with_tok.tokenizer.encode("The quick brown fox")
    assert ids[0] == 1 and with_tok.tokenizer.decode(ids) == "The quick brown fox"
    assert 2 in with_tok.tokenizer.eos_token_ids


def test_generation_config_eos_ids_are_added(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_model(str(path)).config.eos_token_ids == (2, 7)


def test_fingerprint_depends_on_dtype_and_block_size():
    f32, bf16 = load_model("tiny"), load_model("tiny", dtype="bfloat16")
    assert model_fingerprint(f32, 16) == model_fingerprint(load_model("tiny"), 16)
    assert model_fingerprint(f32, 16) != model_fingerprint(f32, 32)
    assert model_fingerprint(f32, 16) != model_fingerprint(bf16, 16)


def test_tiny_weights_are_deterministic():
    a, b = tiny_state_dict(), tiny_state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(a) == 2 + 9 * TINY_CONFIG.num_hidden_layers + 1     # embed, head, layers, norm


def test_tiny_greedy_has_clear_winners():
    loaded = load_model("tiny")
    ref = ReferenceModel(loaded.config, tiny_state_dict())
    prompt = loaded.tokenizer.encode("Hello, tiny model!")
    tokens, _ = ref.greedy(prompt, 24)
    logits = ref.logits(prompt + tokens)[len(prompt) - 1:-1]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-3
    assert len(set(tokens)) > 4                  # not stuck on one token
    assert torch.equal(logits.argmax(-1), torch.tensor(tokens))


def test_greedy_stops_at_eos_unless_ignored():
    loaded = load_model("tiny")
    ref = ReferenceModel(loaded.config, tiny_state_dict())
    prompt = loaded.tokenizer.encode("abc")
    tokens, last = ref.greedy(prompt, 6)
    assert len(tokens) == 6 and last.shape == (TINY_CONFIG.vocab_size,)
    stopped, _ = ref.greedy(prompt, 6, eos_token_ids=(tokens[2],), ignore_eos=False)
    assert stopped == tokens[:3]


def test_exported_tiny_loads_identically(tmp_path):
    path = export_tiny(tmp_path / "tiny")
    builtin, exported = load_model("tiny"), load_model(str(path))
    assert isinstance(exported.tokenizer, ByteTokenizer)
    assert exported.tokenizer.vocab_size == TINY_CONFIG.vocab_size
    assert exported.config.eos_token_ids == TINY_CONFIG.eos_token_ids
    assert dataclasses.replace(exported.config, name="tiny") == TINY_CONFIG
    ours = paged_logits(builtin, PROMPT)
    assert torch.equal(ours, paged_logits(exported, PROMPT))
    assert (hf_logits(path, PROMPT) - ours).abs().max().item() < TOL
