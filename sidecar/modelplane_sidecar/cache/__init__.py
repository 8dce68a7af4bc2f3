"""The response cache: exact-match answers keyed by tenant, policy version and canonical request.

`key.py` (canonical form and digest), `store.py` (in-process LRU bounded in bytes, with TTL and a
stale window), `redis_store.py` (a shared Redis that degrades to the local store), `replay.py`
(cached answers replayed as SSE streams; streams recorded into complete answers) and
`response_cache.py` (the per-request plan the server and the forwarder use).
"""

from .replay import StreamRecorder, replay_frames
from .response_cache import (
    CONTROL_HEADER,
    STATE_HEADER,
    CachePlan,
    CacheState,
    ResponseCache,
)
from .store import CachedResponse

__all__ = [
    "CONTROL_HEADER",
    "STATE_HEADER",
    "CachePlan",
    "CacheState",
    "CachedResponse",
    "ResponseCache",
    "StreamRecorder",
    "replay_frames",
]
