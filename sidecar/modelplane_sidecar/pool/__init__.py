"""Self-hosted model pools: which replica of an endpoint serves an attempt, and how loaded each is.

`replicas.py` (replica state, power-of-two-choices pick, pool saturation for overflow),
`engines.py` (per-engine Prometheus metric names), `promtext.py` (reads a few gauges from a
metrics page), `scraper.py` (bounded-rate scraping with jitter), `sharing.py` (load snapshots on
the config stream). Endpoint choice stays in `routing/`; see docs/self-hosted.md.
"""

from .engines import ENGINE_METRICS, EngineMetrics, LoadReading, reading_from
from .replicas import ReplicaPool, ReplicaState, Saturation
from .scraper import LoadScraper, scrape
from .sharing import LOAD, apply_load_message, load_message

__all__ = [
    "ENGINE_METRICS",
    "LOAD",
    "EngineMetrics",
    "LoadReading",
    "LoadScraper",
    "ReplicaPool",
    "ReplicaState",
    "Saturation",
    "apply_load_message",
    "load_message",
    "reading_from",
    "scrape",
]
