"""SpecServe: SLO-aware LLM serving with adaptive speculative decoding."""

from specserve.config import EngineConfig, SpeculativeConfig
from specserve.engine.async_engine import AsyncLLMEngine
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.request import RequestOutput
from specserve.engine.sampling_params import SamplingParams, StructuredOutput
from specserve.llm import LLM
from specserve.spec.tree import TreeBudget

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutput",
    "SpeculativeConfig",
    "TreeBudget",
]
