"""fdpd: LLM serving with prefill/decode disaggregation."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig", "__version__"]

if TYPE_CHECKING:
    from fdpd.config import EngineConfig
    from fdpd.llm import LLM
    from fdpd.sampling_params import SamplingParams


def __getattr__(name: str):
    # Lazy, so that `import fdpd` (e.g. in the router process) does not import torch.
    if name == "LLM":
        from fdpd.llm import LLM
        return LLM
    if name == "SamplingParams":
        from fdpd.sampling_params import SamplingParams
        return SamplingParams
    if name == "EngineConfig":
        from fdpd.config import EngineConfig
        return EngineConfig
    raise AttributeError(name)
