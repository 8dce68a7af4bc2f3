"""Per-engine Prometheus metric names: which series say how loaded a model server is.

Every engine reports the same three things under its own names: requests queued for a slot
(waiting), requests being decoded in the current batch (running), and how full the KV cache is
(0..1). Names are tried in order and the first one present wins, so a renamed metric (vLLM's
`gpu_cache_usage_perc` became `kv_cache_usage_perc`) keeps working across versions. Series with
labels (one per model or data-parallel rank) are summed for the counts and averaged for the
cache share.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Engine


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    waiting: tuple[str, ...]
    running: tuple[str, ...]
    #: Share of the KV cache in use, 0..1 (empty: the engine does not report it).
    kv_cache: tuple[str, ...] = ()

    def names(self) -> frozenset[str]:
        return frozenset((*self.waiting, *self.running, *self.kv_cache))


ENGINE_METRICS: dict[Engine, EngineMetrics] = {
    # vLLM V1 (>= 0.7) and V0; the "perc" gauges are fractions 0..1 despite the name.
    Engine.VLLM: EngineMetrics(
        waiting=("vllm:num_requests_waiting",),
        running=("vllm:num_requests_running",),
        kv_cache=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    # SGLang with --enable-metrics; token_usage is the share of KV-cache tokens in use.
    Engine.SGLANG: EngineMetrics(
        waiting=("sglang:num_queue_reqs",),
        running=("sglang:num_running_reqs",),
        kv_cache=("sglang:token_usage",),
    ),
    # Text Generation Inference: the router's queue and the current batch; no KV-cache gauge.
    Engine.TGI: EngineMetrics(
        waiting=("tgi_queue_size",),
        running=("tgi_batch_current_size",),
    ),
    # llama.cpp's llama-server with --metrics: deferred requests wait for a free slot.
    Engine.LLAMACPP: EngineMetrics(
        waiting=("llamacpp:requests_deferred",),
        running=("llamacpp:requests_processing",),
        kv_cache=("llamacpp:kv_cache_usage_ratio",),
    ),
}


@dataclass(frozen=True, slots=True)
class LoadReading:
    """What one scrape of one replica said."""

    waiting: float
    running: float
    kv_cache: float | None = None


def reading_from(engine: Engine, samples: dict[str, list[float]]) -> LoadReading | None:
    """The load in `samples` (metric name -> values of its series); None if the engine's
    waiting and running metrics are both absent (wrong engine, or metrics turned off)."""
    table = ENGINE_METRICS[engine]

    def first(names: tuple[str, ...]) -> list[float] | None:
        for name in names:
            values = samples.get(name)
            if values:
                return values
        return None

    waiting, running = first(table.waiting), first(table.running)
    if waiting is None and running is None:
        return None
    kv = first(table.kv_cache)
    return LoadReading(
        waiting=sum(waiting or ()),
        running=sum(running or ()),
        kv_cache=min(1.0, max(0.0, sum(kv) / len(kv))) if kv else None,
    )
