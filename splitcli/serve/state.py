"""What every SplitCloud servicer shares, the local one (serve/cloud.py) and the Ray front
(serve/ray_backend.py): the bearer-token check and the wait for a stream's Open, the counters
serve-cloud's /metrics reads, the drain flag, and the idle reaper that ends silent streams.

The reaper: each servicer registers every stream it waits on under a key, with its gRPC context,
as soon as it authenticated: first as waiting (no Open yet), then as a session once admitted. A
stream whose last message is older than `idle_timeout_s` and that is not busy (a step is being
forwarded) is dropped from the registry, the servicer's `_reaped_locked(key)` frees what it held,
and its context is cancelled: the handler's request iterator stops and its worker thread is free.
"""

from __future__ import annotations

import dataclasses
import hmac
import threading
import time
from dataclasses import dataclass

import grpc


@dataclass
class ServeCounters:
    """Running totals since start (what issue 13's /metrics will export); read via `counters()`."""

    sessions_admitted: int = 0
    sessions_refused: int = 0
    prompt_tokens: int = 0      # positions of each session's first step
    generated_tokens: int = 0   # tokens (or top-k answers) sent back
    frame_bytes_in: int = 0     # payload bytes of complete steps
    reply_bytes_out: int = 0    # serialized bytes of the token / top-k replies


@dataclass
class _Watched:
    context: object
    last_active: float
    waiting: bool       # connected, its Open not yet received
    busy: bool = False  # a step is being processed: not idle, whatever its length


def expected_auth(api_key: str) -> bytes:
    """The authorization metadata a client must send: `Bearer <key>`."""
    return f"Bearer {api_key}".encode()


class ServingState:
    """Auth, counters, drain flag and idle reaper of a SplitCloud servicer. The servicer sets
    `_expected_auth` (expected_auth(key)), `_lock`, `_counters`, `_draining` and calls
    `_start_reaper(idle_timeout_s)` in its constructor and `_stop_reaper()` in its `close()`."""

    def _authenticate(self, context) -> None:
        got = dict(context.invocation_metadata()).get("authorization", "")
        if not isinstance(got, str) or not hmac.compare_digest(got.encode(), self._expected_auth):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")

    def _first_message(self, request_iterator, context):
        """The stream's first message, which must be an Open (else INVALID_ARGUMENT). Registered
        meanwhile so the reaper can cancel a stream that never sends it."""
        self._watch(("open", id(context)), context, waiting=True)
        try:
            first = next(request_iterator, None)
        finally:
            self._unwatch(("open", id(context)))
        if first is None or first.WhichOneof("kind") != "open":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a session must start with an Open message")
        return first

    def counters(self) -> ServeCounters:
        with self._lock:
            return dataclasses.replace(self._counters)

    def start_draining(self) -> None:
        """Admit no new session (UNAVAILABLE); running ones go on to their end."""
        with self._lock:
            self._draining = True

    @property
    def draining(self) -> bool:
        with self._lock:
            return self._draining

    @property
    def waiting_count(self) -> int:
        """Streams connected but not yet past their Open (the server queues no admitted work)."""
        with self._lock:
            return sum(w.waiting for w in self._watched.values())

    # -- the idle reaper ---------------------------------------------------------------------------
    def _start_reaper(self, idle_timeout_s: float) -> None:
        self._watched: dict[object, _Watched] = {}
        self._idle_timeout_s = idle_timeout_s
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="splitllm-cloud-reaper", daemon=True)
        self._reaper.start()

    def _stop_reaper(self) -> None:
        self._stop.set()
        self._reaper.join(timeout=5)

    def _watch_locked(self, key, context, waiting: bool = False) -> None:
        self._watched[key] = _Watched(context, time.monotonic(), waiting)

    def _watch(self, key, context, waiting: bool = False) -> None:
        with self._lock:
            self._watch_locked(key, context, waiting)

    def _unwatch(self, key) -> None:
        with self._lock:
            self._watched.pop(key, None)

    def _touch(self, key, busy: bool = False) -> bool:
        """The stream `key` is active now (and busy or not); False once it was reaped. Under the
        reaper's lock: a stream is either reaped or busy, never both."""
        with self._lock:
            watched = self._watched.get(key)
            if watched is not None:
                watched.last_active, watched.busy = time.monotonic(), busy
            return watched is not None

    def _reaped_locked(self, key) -> None:
        """Free what the stream `key` held (called under `_lock`, before its context is cancelled)."""

    def _reap(self) -> None:
        limit = self._idle_timeout_s
        while not self._stop.wait(min(1.0, limit / 4)):
            now = time.monotonic()
            with self._lock:
                idle = [k for k, w in self._watched.items() if not w.busy and now - w.last_active > limit]
                contexts = [self._watched.pop(k).context for k in idle]
                for key in idle:
                    self._reaped_locked(key)
            for context in contexts:
                context.cancel()  # ends the stream; its handler's request iterator stops
