"""The model is the cluster's: the one model a router serves, and the gate every registering
instance passes.

A router started with ``--model`` serves that model; an instance registering with another one
is refused. A router started without ``--model`` takes the model of the first instance that
registers: it loads the tokenizer and chat template from the model directory that instance
reports (an absolute path; the router must see the same files, as it does on one host, or
with the shared model volume of ``deploy/docker-compose.yml`` and ``deploy/k8s/``). Loading
from the path, rather than shipping tokenizer files over the control channel, keeps the
control messages small and the tokenizer loaded the one way ``--model`` loads it; a router
that cannot read the path refuses the instance with a message saying to give it ``--model``.

"Same model" is decided by the model fingerprint the instance already uses for its prefix
hashes and KV-store objects (``ModelConfig.fingerprint``: the model's config, the KV dtype and
the block size): the router recomputes it from its own config with the dtype and block size
the instance reports and compares. The same weights in another dtype or block layout are the
same model to the router (its tokenizer fits); the registry's peer check still keeps instances
of one cluster on one KV layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fdpd.model.config import ModelConfig
from fdpd.model.tokenizer import Tokenizer
from fdpd.pd.protocol import Register
from fdpd.router.errors import APIError

log = logging.getLogger(__name__)
NO_MODEL_YET = ("no model yet: this router was started without --model and takes the model "
                "of the first instance that registers; none has")


@dataclass(frozen=True)
class FrontendModel:
    """What the router needs of the model: no weights, just names, limits and the tokenizer."""

    name: str                      # as the operator gave it: what /v1/models lists
    config: ModelConfig
    max_model_len: int
    tokenizer: Tokenizer | None
    chat_template: str | None

    def describe(self) -> str:
        c = self.config
        return (f"{self.name!r} ({c.architecture}, vocab {c.vocab_size}, "
                f"{c.num_hidden_layers} layers, hidden {c.hidden_size})")


def given_model(name: str, config: ModelConfig | None, max_model_len: int,
                tokenizer: Tokenizer | None, chat_template: str | None) -> FrontendModel:
    """The model a router was started with; its config is read from ``name`` when not given
    (a caller that loaded the tokenizer itself, as tests do)."""
    if config is None:
        from fdpd.model.loader import load_model_metadata

        config = load_model_metadata(name)[0]
    return FrontendModel(name, config, max_model_len, tokenizer, chat_template)


def load_frontend_model(model: str, max_model_len: int | None, name: str | None = None
                        ) -> FrontendModel:
    """``model``: 'tiny' or a model directory; ``name``: how to list it (default ``model``)."""
    from fdpd.engine.engine import resolve_max_model_len
    from fdpd.model.loader import load_model_metadata

    cfg, tok = load_model_metadata(model)
    return FrontendModel(name or model, cfg, resolve_max_model_len(cfg, max_model_len), tok,
                         getattr(tok, "chat_template", None) if tok is not None else None)


class ClusterModel:
    """The router's model (``current``), or none yet when it adopts the first instance's.
    Used on the router's event loop only."""

    def __init__(self, model: FrontendModel | None, max_model_len: int | None = None,
                 on_adopt: Callable[[FrontendModel], None] | None = None):
        self.current = model
        self.adopted_from: str | None = None       # the instance whose model was taken
        self._max_model_len = max_model_len        # --max-model-len, applied on adoption
        self._on_adopt = on_adopt

    @property
    def serving(self) -> FrontendModel:
        """The model; before there is one, every OpenAI endpoint answers 503."""
        if self.current is None:
            raise APIError(503, NO_MODEL_YET, code="model_not_ready")
        return self.current

    def admit(self, msg: Register) -> str:
        """'' if ``msg``'s instance serves this router's model (taking it first, when the
        router has none), else why not, naming both models."""
        if self.current is None:
            return self._adopt(msg)
        return _mismatch(self.current, msg, "this router serves")

    def _adopt(self, msg: Register) -> str:
        source = msg.model_path or msg.model
        # Synchronous on the event loop, once: the same load ``--model`` does before the
        # router serves (config.json and tokenizer.json, no weights).
        try:
            model = load_frontend_model(source, self._max_model_len, name=msg.model)
        except Exception as e:        # any unreadable model is a refusal, never a crash
            return (f"this router was started without --model and cannot load the model "
                    f"instance {msg.instance_id} serves from {source!r} ({e}); start the "
                    f"router with --model pointing at a copy of that model")
        why = _mismatch(model, msg, f"the copy this router loaded from {source!r} is")
        if why:
            return why
        self.current, self.adopted_from = model, msg.instance_id
        log.warning("router serves %s, the model of instance %s (no --model given)",
                    model.describe(), msg.instance_id)
        if self._on_adopt is not None:
            self._on_adopt(model)
        return ""

    def view(self) -> dict[str, Any]:
        """For /v1/cluster."""
        if self.current is None:
            return {"name": None, "adopted_from": None, "status": NO_MODEL_YET}
        c = self.current.config
        return {"name": self.current.name, "architecture": c.architecture,
                "vocab_size": c.vocab_size, "max_model_len": self.current.max_model_len,
                "adopted_from": self.adopted_from}


def _mismatch(model: FrontendModel, msg: Register, ours: str) -> str:
    if not msg.kv_dtype:
        return (f"instance {msg.instance_id} did not report its KV dtype, so its model cannot "
                f"be checked against {model.name!r}: run the same fdpd version everywhere")
    if model.config.fingerprint(msg.kv_dtype, msg.block_size) == msg.fingerprint:
        return ""
    return (f"model mismatch: instance {msg.instance_id} ({msg.role}) serves {msg.model!r} "
            f"(fingerprint {msg.fingerprint.hex()[:12]}), but {ours} {model.describe()}; "
            f"every instance must serve the router's model: start the instance with "
            f"--model {model.name}, or the router with --model {msg.model}")
