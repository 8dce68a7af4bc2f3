"""A local stand-in for one vLLM replica: OpenAI API, a bounded batch, a queue, and /metrics.

Like vLLM it runs at most `slots` requests at once (`--max-num-seqs`); the rest wait in FIFO
order. Its `/metrics` page speaks vLLM's Prometheus names (`vllm:num_requests_waiting`,
`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, or the older
`vllm:gpu_cache_usage_perc` with `legacy_names`), with the labels vLLM puts on them. Tests and
the benchmark control its load: `service_seconds` per request, `extra_waiting` (requests other
clients have queued, reported in the metrics), and `hold()` to occupy slots as background load.
Replies are canned text from the OpenAI stand-in it wraps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from .openai import OpenAIStandIn


@dataclass
class VLLMStandIn:
    name: str
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    slots: int = 4
    #: Time one request holds its slot (the model's decode time), before the reply is sent.
    service_seconds: float = 0.0
    #: Requests queued by other clients, added to `vllm:num_requests_waiting`.
    extra_waiting: int = 0
    #: KV-cache share one running request uses.
    kv_per_request: float = 0.05
    legacy_names: bool = False
    api: OpenAIStandIn = field(init=False)
    running: int = 0
    waiting: int = 0
    #: Seconds each request waited for a slot, in arrival order.
    queue_waits: list[float] = field(default_factory=list)
    scrapes: int = 0
    _slot_free: asyncio.Condition | None = None

    def __post_init__(self) -> None:
        self.api = OpenAIStandIn(self.name)

    @property
    def served(self) -> int:
        return len(self.api.received)

    def _condition(self) -> asyncio.Condition:
        if self._slot_free is None:
            self._slot_free = asyncio.Condition()
        return self._slot_free

    async def acquire(self) -> float:
        """Take a slot (FIFO); returns the seconds spent waiting for it."""
        arrived = time.perf_counter()
        cond = self._condition()
        async with cond:
            self.waiting += 1
            try:
                await cond.wait_for(lambda: self.running < self.slots)
            finally:
                self.waiting -= 1
            self.running += 1
        return time.perf_counter() - arrived

    async def release(self) -> None:
        cond = self._condition()
        async with cond:
            self.running -= 1
            cond.notify()

    async def hold(self, seconds: float) -> None:
        """Background load: occupy one slot for `seconds` (as another client's request would)."""
        await self.acquire()
        try:
            await asyncio.sleep(seconds)
        finally:
            await self.release()

    def metrics_text(self) -> str:
        labels = f'{{engine="0",model_name="{self.model}"}}'
        kv_name = "vllm:gpu_cache_usage_perc" if self.legacy_names else "vllm:kv_cache_usage_perc"
        kv = min(1.0, self.running * self.kv_per_request)
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{labels} {float(self.running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{labels} {float(self.waiting + self.extra_waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            f"# TYPE {kv_name} gauge",
            f"{kv_name}{labels} {kv}",
            "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
            "# TYPE vllm:time_to_first_token_seconds histogram",
            f'vllm:time_to_first_token_seconds_bucket{{le="0.1",model_name="{self.model}"}} 0.0',
            f'vllm:time_to_first_token_seconds_bucket{{le="+Inf",model_name="{self.model}"}} 0.0',
        ]
        return "\n".join(lines) + "\n"

    async def _metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        return web.Response(text=self.metrics_text(), content_type="text/plain")

    @web.middleware
    async def _batch(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.method != "POST":
            return await handler(request)
        self.queue_waits.append(await self.acquire())
        try:
            if self.service_seconds:
                await asyncio.sleep(self.service_seconds)
            return await handler(request)
        finally:
            await self.release()

    def app(self) -> web.Application:
        app = self.api.app()
        app.middlewares.append(self._batch)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")
