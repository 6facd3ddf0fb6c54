"""The cloud half on one Ray Serve replica (issue 16), driven by the same session code as `serve-cloud`.

A replica holds one `CloudServicer` (serve/cloud.py): admission against its own session limit and
KV budget, step ordering, frame checks, idle reaping, counters, and one `Batcher` (continuous
batching stays per replica; the half on the fast path where the model supports it, as in
`serve-cloud`: `stats()["fast_cloud"]` says which). The servicer is not copied here: each session
is the servicer's own `Session` generator, fed through `InProcessStream` instead of a gRPC stream,
so every rule a local `serve-cloud` enforces is enforced here by the same lines. The gRPC front
(serve/ray_backend.py) forwards each client message of a session to the replica that admitted it
(serve/ray_router.py pins it there) and relays the replies and the final status.

Messages cross Ray as serialized protobuf bytes; a status crosses as (code name, details).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import sys
import threading
import time

import grpc

from splitcli.serve.cloud import CloudServicer, CloudSettings
from splitcli.serve.proto import split_pb2 as pb

_NEED = object()  # the servicer asks for its next message: the one before is fully handled
_END = object()  # no more messages: the servicer's request iterator stops
#: Ended streams whose step counts `stats()` still reports (bounded: a replica runs for months).
HISTORY = 1024


class _Aborted(Exception):
    """What `context.abort` raises inside the servicer (gRPC raises too: the handler stops there)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _StreamContext:
    """The part of grpc.ServicerContext that CloudServicer.Session uses, for an in-process stream."""

    def __init__(self, metadata, inbox: queue.Queue):
        self._metadata, self._inbox = metadata, inbox
        self.cancelled = False

    def invocation_metadata(self):
        return self._metadata

    def abort(self, code, details):
        raise _Aborted(code, details)

    def cancel(self):
        """The servicer's idle reaper ends the stream, as gRPC's cancel would."""
        self.cancelled = True
        self._inbox.put(_END)


class InProcessStream:
    """One `CloudServicer.Session` on its own thread (as gRPC runs each stream on one), fed one
    message at a time: `feed` returns the replies that message produced (none for a chunk, a
    duplicate or a KV step; one token otherwise) and, once the session ended, its status."""

    def __init__(self, servicer: CloudServicer, metadata, name: str, timeout_s: float):
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self.context = _StreamContext(metadata, self._inbox)
        self.timeout_s = timeout_s
        self.steps = 0  # step messages fed (the replica's own per-session counter)
        self.status: tuple[str, str] | None = None  # (code name or "OK", details) once ended
        self._thread = threading.Thread(target=self._run, args=(servicer,), name=f"splitllm-replica-{name}",
                                        daemon=True)
        self._thread.start()
        self._collect()  # authentication happens before the first message is asked for

    @property
    def ended(self) -> bool:
        return self.status is not None

    def _requests(self):
        while True:
            self._outbox.put(_NEED)
            msg = self._inbox.get()
            if msg is _END:
                return
            yield msg

    def _run(self, servicer: CloudServicer) -> None:
        try:
            for reply in servicer.Session(self._requests(), self.context):
                self._outbox.put(reply)
            if self.context.cancelled:
                self._outbox.put(("DEADLINE_EXCEEDED", "the session was idle too long and was freed"))
            else:
                self._outbox.put(("OK", ""))
        except _Aborted as exc:
            self._outbox.put((exc.code.name, exc.details))
        except Exception as exc:  # noqa: BLE001 - one stream's failure must not end the replica's others
            self._outbox.put(("INTERNAL", f"cloud replica error: {type(exc).__name__}: {exc}"))

    def _collect(self) -> list[pb.ServerMessage]:
        replies = []
        while self.status is None:
            try:
                item = self._outbox.get(timeout=self.timeout_s)
            except queue.Empty:
                self.status = ("DEADLINE_EXCEEDED", f"the cloud replica did not answer within {self.timeout_s:g} s")
                self.context.cancel()
                break
            if item is _NEED:
                break
            if isinstance(item, tuple):
                self.status = item
            else:
                replies.append(item)
        return replies

    def feed(self, msg: pb.ClientMessage) -> list[pb.ServerMessage]:
        if self.status is not None:
            return []
        self._inbox.put(msg)
        self.steps += msg.WhichOneof("kind") == "step"
        return self._collect()

    def end(self) -> None:
        """Close the session (as a Close message does) and wait for the servicer to free it."""
        if self.status is None:
            self.feed(pb.ClientMessage(close=pb.Close()))
        self._thread.join(timeout=self.timeout_s)


def _replica_id() -> str:
    serve = sys.modules.get("ray.serve")  # inside a replica Serve is loaded; elsewhere, not imported for this
    if serve is not None:
        from ray.serve.exceptions import RayServeException

        try:
            return serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # not inside a replica
            pass
    return f"local-{os.getpid()}"


def bind_loopback_only() -> None:
    """Ray Serve (2.60) binds each replica's inter-deployment gRPC server to [::]:0, all interfaces,
    with no setting to change it. On a loopback-only instance it is bound to 127.0.0.1 instead:
    called in the replica's constructor, which Serve runs before it starts that server. Nothing
    happens on a Ray whose replica module has no such function (the pinned version has it)."""
    from ray.serve._private import replica as serve_replica

    original = getattr(serve_replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "splitllm_loopback", False):
        return

    def loopback(server, address: str):
        return original(server, address.replace("[::]", "127.0.0.1", 1))

    loopback.splitllm_loopback = True
    serve_replica.add_port_to_grpc_server = loopback


class SplitReplica:
    """The Ray Serve deployment class. `factory()` returns (split, model sha256) on this replica:
    each replica loads its own weights (a cluster's machines hold them; nothing large crosses Ray).
    `settings` are the per-replica limits; their api_key is the front's internal key, not users'."""

    def __init__(self, factory, settings: CloudSettings, threads: int = 1, timeout_s: float = 300.0,
                 loopback: bool = False):
        import torch

        if loopback:
            bind_loopback_only()
        torch.set_num_threads(threads)
        split, sha256 = factory()
        self.settings = dataclasses.replace(settings, model_sha256=sha256)
        self.servicer = CloudServicer(split, self.settings)
        self.replica_id = _replica_id()
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {settings.api_key}"),)
        self._lock = threading.Lock()
        self._streams: dict[str, InProcessStream] = {}
        self._history: collections.OrderedDict[str, int] = collections.OrderedDict()

    # -- what the front calls (through the DeploymentHandle and the SessionRouter) -------------
    def open(self, key: str, message: bytes, exclude: tuple = (), load: dict | None = None) -> dict:
        """Admit a session from its Open message (`exclude` and `load` are for the router)."""
        stream = InProcessStream(self.servicer, self._metadata, key[:8], self.timeout_s)
        replies = stream.feed(pb.ClientMessage.FromString(message))
        if not stream.ended:
            with self._lock:
                self._streams[key] = stream
        return self._answer(replies, stream.status, bytes_per_token=self.servicer.bytes_per_token)

    def feed(self, key: str, message: bytes, replica: str = "") -> dict:
        """One client message of an admitted session (`replica` pins the route; checked here too:
        a request Serve retried on another replica after its holder died must not run here)."""
        started = time.perf_counter()
        with self._lock:
            stream = self._streams.get(key) if replica == self.replica_id else None
        if stream is None:
            return self._answer([], ("UNAVAILABLE", f"cloud replica {replica or '?'} holding this session is gone; "
                                                    "reconnect to rebuild the session"))
        replies = stream.feed(pb.ClientMessage.FromString(message))
        if stream.ended:
            self._forget(key, stream)
        # held_s: time spent here, so the front can tell its routing and transport cost apart
        return self._answer(replies, stream.status, held_s=time.perf_counter() - started)

    def close(self, key: str, replica: str = "") -> None:
        """The front's stream ended (edge gone, error): free the session now, not at the idle timeout."""
        with self._lock:
            stream = self._streams.get(key) if replica == self.replica_id else None
        if stream is not None:
            stream.end()
            self._forget(key, stream)

    def stats(self, exclude: tuple = ()) -> dict:
        """This replica's own counters: complete messages per session key (live and recent), sessions,
        KV reserved, the servicer's totals and the batcher's."""
        with self._lock:
            for key, stream in list(self._streams.items()):
                if stream.ended:  # reaped while idle
                    self._forget_locked(key, stream)
            streams = {**self._history, **{k: s.steps for k, s in self._streams.items()}}
        import psutil

        b = self.servicer.batcher
        return {"replica": self.replica_id, "pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss,
                "streams": streams,
                "sessions": self.servicer.session_count, "kv_used": self.servicer.kv_used,
                "fast_cloud": self.servicer.fast,
                "counters": dataclasses.asdict(self.servicer.counters()),
                "forwards": b.forwards, "batched_steps": b.batched_steps, "largest_batch": b.largest_batch}

    def record_routing_stats(self) -> dict:
        """Ray Serve polls this for the router (RunningReplica.routing_stats): free capacity."""
        s = self.settings
        return {"kv_free": s.kv_budget_bytes - self.servicer.kv_used,
                "sessions_free": s.max_sessions - self.servicer.session_count}

    def __del__(self):  # Serve's graceful replica shutdown
        servicer = getattr(self, "servicer", None)
        if servicer is not None:
            servicer.close()

    # -- helpers ---------------------------------------------------------------------------------
    def _forget(self, key: str, stream: InProcessStream) -> None:
        with self._lock:
            self._forget_locked(key, stream)

    def _forget_locked(self, key: str, stream: InProcessStream) -> None:
        if self._streams.get(key) is stream:
            del self._streams[key]
            self._history[key] = stream.steps
            while len(self._history) > HISTORY:
                self._history.popitem(last=False)

    def _answer(self, replies, status, **extra) -> dict:
        return {"replica": self.replica_id, "replies": [r.SerializeToString() for r in replies],
                "status": status, **extra}
