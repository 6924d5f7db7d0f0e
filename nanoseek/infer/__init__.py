"""Inference: KV cache, engine (batching, sampling, MTP speculative decoding), chat template, server."""

from .cache import KVCache, kv_values_per_token
from .engine import Engine, EngineStats, Request, SamplingParams, sample_token
from .sample import generate_simple

__all__ = ["Engine", "EngineStats", "KVCache", "Request", "SamplingParams", "generate_simple",
           "kv_values_per_token", "sample_token"]
