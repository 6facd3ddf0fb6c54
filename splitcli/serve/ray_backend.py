"""`serve-cloud --backend ray`: the cloud half as a Ray Serve deployment behind the same gRPC front.

The front (this process) keeps what faces the edges: the gRPC server, bearer auth, TLS, the
counters behind /metrics and /health, drain. Replicas (serve/ray_replica.py, one `CloudServicer`
each) hold the sessions: admission against each replica's own session limit and KV budget,
continuous batching per replica. Each client message goes to the replica holding its session
through a `DeploymentHandle` whose `SessionRouter` (serve/ray_router.py) pins it there.

- New session: the Open goes to the replica with the most free KV; a full replica refuses
  (RESOURCE_EXHAUSTED) and the front asks the next one; when all have refused, the edge gets
  RESOURCE_EXHAUSTED, as from a full local server.
- Replica loss: a call to a dead replica fails (or Serve retries it on a live replica, which
  does not hold the session); either way the edge gets UNAVAILABLE and its client (serve/client.py)
  reconnects, is admitted on a live replica and replays the hidden states of every position so
  far as one prefill, so greedy output is unchanged. Serve's controller restarts the replica.

Ray is an optional extra (`pip install 'splitllm[ray]'`); `require_ray` says so when it is missing.
A local Ray instance (no `address`) is started here with `num_cpus`, no dashboard, a small object
store, bound to loopback only, and shut down by `RayCloudServer.stop`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
import uuid
from dataclasses import dataclass

import grpc

from splitcli.errors import SplitLLMError
from splitcli.serve.cloud import CloudServer, CloudSettings
from splitcli.serve.state import ServeCounters, ServingState, expected_auth
from splitcli.serve.proto import split_pb2 as pb
from splitcli.serve.proto import split_pb2_grpc as pb_grpc

RAY_MISSING = "the Ray backend needs Ray Serve, an optional extra: pip install 'splitllm[ray]'"
APP_NAME = "splitllm-cloud"
AUTOSCALE_FORM = "MIN:MAX with 1 <= MIN <= MAX"
OPEN_TIMEOUT_S = 30.0  # all tries of one Open together (admission only, no forward)
#: How long an Open waits for the one before it; past that it goes on without the lock (a stuck
#: replica must not hold every admission), only placing itself on a load that may lag by one.
OPEN_LOCK_WAIT_S = 1.0
#: Ray gives its raylet a fixed 30 s to register with the GCS and then raises. On a busy 2-core CI
#: host a raylet once never came up (no log of its own) while the next start, 45 s later, did: one
#: more try after clearing the failed one costs seconds; a second failure is reported.
LOCAL_START_TRIES = 2


def require_ray() -> None:
    """SplitLLMError with the install line when Ray Serve is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
        from ray.serve import request_router  # noqa: F401 - the API the session router needs
    except ImportError:
        raise SplitLLMError(RAY_MISSING) from None


@dataclass(frozen=True)
class RayOptions:
    """How the cloud half runs on Ray. `replicas` fixed, or `autoscale` = (min, max) replicas."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    address: str | None = None          # an existing Ray cluster; None starts a local instance
    num_cpus: int = 2                   # the local instance's CPUs
    object_store_bytes: int = 200 << 20  # the local instance's object store (frames are small)
    replica_cpus: float = 1.0           # Ray CPUs each replica claims
    replica_threads: int = 1            # torch threads in each replica
    health_check_period_s: float = 2.0
    call_timeout_s: float = 300.0       # one forwarded message (a long prefill included)

    def __post_init__(self) -> None:
        # Errors say "ray option NAME ...": the CLI names the flag of the same name instead.
        for name in ("replicas", "num_cpus", "replica_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SplitLLMError(f"ray option {name} must be an integer >= 1, got {value!r}")
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise SplitLLMError(f"ray option autoscale must be {AUTOSCALE_FORM}, got {lo}:{hi}")
        if self.object_store_bytes < 75 << 20:  # Ray's own minimum
            raise SplitLLMError("ray option object_store_bytes must be >= 75 MiB")
        for name in ("replica_cpus", "health_check_period_s", "call_timeout_s"):
            if not getattr(self, name) > 0:
                raise SplitLLMError(f"ray option {name} must be > 0, got {getattr(self, name)!r}")

    def describe(self) -> str:
        scale = (f"{self.autoscale[0]}-{self.autoscale[1]} replicas (autoscaled)" if self.autoscale
                 else f"{self.replicas} replica{'s' if self.replicas > 1 else ''}")
        where = f"Ray at {self.address}" if self.address else f"a local Ray instance ({self.num_cpus} CPUs, loopback)"
        return f"{scale} on {where}"

    @property
    def max_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas


def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN:MAX' -> (min, max), two integers; their bounds are `RayOptions`'s to check."""
    lo, sep, hi = text.partition(":")
    try:
        if sep:
            return int(lo), int(hi)
    except ValueError:
        pass
    raise SplitLLMError(f"ray option autoscale must be {AUTOSCALE_FORM}, got {text!r}")


def load_model_split(model: str, spec, data_dir=None):
    """A replica's factory (picklable with functools.partial): load `model`, build the split."""
    from splitcli.deploy import build_split
    from splitcli.model.loader import load_model

    lm = load_model(model)
    return build_split(lm, spec, data_dir, None, keep_stats=False), lm.sha256


def model_split_factory(model: str, spec, data_dir=None):
    return functools.partial(load_model_split, model, spec, data_dir)


# -- Ray itself ------------------------------------------------------------------------------------

def start_ray(options: RayOptions) -> bool:
    """Connect to `options.address`, or start a local instance; True when started here."""
    require_ray()
    import ray

    if ray.is_initialized():
        return False
    if options.address:
        ray.init(address=options.address, log_to_driver=False)
        return False
    # Loopback only: Ray resolves 127.0.0.1 to the host's outward address and binds its servers to
    # all interfaces unless it thinks it runs as a single-machine cluster. The variable reaches the
    # processes Ray starts; the constant covers a driver that imported ray before it was set.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    for attempt in range(1, LOCAL_START_TRIES + 1):
        before = _child_pids()
        try:
            ray.init(num_cpus=options.num_cpus, include_dashboard=False,
                     object_store_memory=options.object_store_bytes, _node_ip_address="127.0.0.1",
                     log_to_driver=False)
            return True
        except Exception as e:  # Ray raises a plain Exception when its node does not come up
            # A failed init leaves its GCS, monitor and dashboard running and unowned (ray.shutdown
            # does not know them): stop what this try started before the next one or the error.
            ray.shutdown()
            _stop_trees(_child_pids() - before)
            if attempt == LOCAL_START_TRIES:
                raise SplitLLMError(f"could not start a local Ray instance after {attempt} tries: {e} "
                                    "(Ray's logs: /tmp/ray/session_latest/logs)") from e
    raise AssertionError("unreachable")


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children()}


def _stop_trees(pids: set[int], wait_s: float = 5.0) -> None:
    """SIGTERM the processes `pids` (children this process started) and their descendants, then
    SIGKILL whatever still runs after `wait_s`. Only new children's trees: a grandchild of a child
    that was already running is not Ray's to stop."""
    import psutil

    procs = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=wait_s)


def deploy(factory, settings: CloudSettings, options: RayOptions):
    """Run the replicas as the Serve application APP_NAME; returns its DeploymentHandle."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from splitcli.serve.ray_replica import SplitReplica
    from splitcli.serve.ray_router import SessionRouter

    scale = ({"autoscaling_config": {"min_replicas": options.autoscale[0], "max_replicas": options.autoscale[1],
                                     "target_ongoing_requests": max(1, settings.max_sessions // 2)}}
             if options.autoscale else {"num_replicas": options.replicas})
    deployment = serve.deployment(SplitReplica, name="SplitReplica").options(
        ray_actor_options={"num_cpus": options.replica_cpus},
        # Every running session may have one step in flight (the batcher needs them together);
        # refusing past the session limit is admission's job, not the queue's.
        max_ongoing_requests=settings.max_sessions + 8,
        request_router_config=RequestRouterConfig(request_router_class=SessionRouter,
                                                  request_routing_stats_period_s=1.0),
        health_check_period_s=options.health_check_period_s,
        **scale)
    serve.start(proxy_location="Disabled")  # the front is our gRPC server: no Serve HTTP proxy
    app = deployment.bind(factory, settings, options.replica_threads, options.call_timeout_s,
                          options.address is None)
    return serve.run(app, name=APP_NAME, route_prefix=None)


# -- the gRPC front --------------------------------------------------------------------------------

class _Lost(Exception):
    """A forwarded call did not reach a replica (died, unreachable, timed out)."""


class RayFrontServicer(ServingState, pb_grpc.SplitCloudServicer):
    """The SplitCloud service of the front: auth here, sessions on the replicas. Offers what
    serve-cloud's /metrics and drain read of a CloudServicer (counters, session and waiting
    counts, kv_used, draining, on_step / on_token hooks); the batch-size histogram is per replica.
    A silent edge is reaped here as on a local server (ServingState): its stream, worker thread and
    session entry go, and the replica is told to free the session."""

    def __init__(self, handle, settings: CloudSettings, options: RayOptions):
        self.handle, self.settings, self.options = handle, settings, options
        self._expected_auth = expected_auth(settings.api_key)
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[str, int]] = {}  # key -> (replica id, KV bytes reserved)
        self._open_lock = threading.Lock()
        self._route_s, self._routed = 0.0, 0
        self._counters = ServeCounters()
        self._draining = False
        self.on_step = None
        self.on_token = None
        self._start_reaper(settings.idle_timeout_s)

    # -- what serve-cloud reads (besides ServingState's counters and drain flag) ----------------------
    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def kv_used(self) -> int:
        with self._lock:
            return sum(reserved for _, reserved in self._sessions.values())

    def sessions_by_replica(self) -> dict[str, list[str]]:
        with self._lock:
            out: dict[str, list[str]] = {}
            for key, (replica, _) in self._sessions.items():
                out.setdefault(replica, []).append(key)
            return out

    def close(self) -> None:
        self._stop_reaper()  # sessions live on the replicas; the reaper is the front's only thread

    def _reaped_locked(self, key) -> None:  # ServingState's reaper: the edge was silent too long
        self._sessions.pop(key, None)

    # -- the RPC ----------------------------------------------------------------------------------
    def Session(self, request_iterator, context):
        self._authenticate(context)
        first = self._first_message(request_iterator, context)
        if self.draining:
            self._refused()
            yield pb.ServerMessage(opened=pb.Opened(admitted=False, reason="the server is draining"))
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is draining: it admits no new session")
        key = uuid.uuid4().hex
        # Opens go one at a time (admission takes milliseconds, no forward), so each sees the load
        # the ones before it placed and a burst of sessions spreads over the replicas; one stuck
        # Open holds the others for OPEN_LOCK_WAIT_S at most.
        locked = self._open_lock.acquire(timeout=OPEN_LOCK_WAIT_S)
        try:
            try:
                answer = self._open(key, first)
            except _Lost as exc:
                answer = {"replica": "", "replies": [], "status": ("UNAVAILABLE",
                                                                   f"no cloud replica could take the session: {exc}")}
            except SplitLLMError as exc:  # the replica's code raised (_call): one line, not its traceback
                answer = {"replica": "", "replies": [], "status": ("INTERNAL", str(exc))}
            if answer["status"] is None:
                with self._lock:
                    self._sessions[key] = (answer["replica"], first.open.max_tokens * answer["bytes_per_token"])
                    self._counters.sessions_admitted += 1
                    self._watch_locked(key, context)
        finally:
            if locked:
                self._open_lock.release()
        replica = answer["replica"]
        replies, status = answer["replies"], answer["status"]
        if status is not None:  # refused: the replica's Opened and its status, as a local server sends them
            self._refused()
            yield from (pb.ServerMessage.FromString(r) for r in replies)
            context.abort(grpc.StatusCode[status[0]], status[1])
        ended = False
        try:
            yield from (pb.ServerMessage.FromString(r) for r in replies)
            admitted_at = last = time.monotonic()
            first_token = True
            for msg in request_iterator:
                if not self._touch(key, busy=True):  # busy while the replica works on it: not idle
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the session was idle too long and was freed")
                self._count_in(msg)
                started = time.perf_counter()
                try:
                    answer = self._call(self.handle.feed, key, msg.SerializeToString(), replica=replica)
                    self._touch(key)
                except _Lost as exc:
                    ended = True
                    context.abort(grpc.StatusCode.UNAVAILABLE,
                                  f"cloud replica {replica} holding this session was lost ({exc}); reconnect to "
                                  "rebuild the session")
                except SplitLLMError as exc:  # the replica's code raised; `ended` stays False: the
                    # finally below still asks the replica to free the session, which may be alive
                    context.abort(grpc.StatusCode.INTERNAL, str(exc))
                self._count_route(time.perf_counter() - started - answer.get("held_s", 0.0))
                for raw in answer["replies"]:
                    reply = pb.ServerMessage.FromString(raw)
                    self._count_out(reply)
                    if reply.WhichOneof("kind") == "token":
                        now = time.monotonic()
                        if self.on_step is not None:
                            self.on_step(time.perf_counter() - started, msg.step.n_tokens)
                        if self.on_token is not None:
                            self.on_token(first_token, now - (admitted_at if first_token else last))
                        first_token, last = False, now
                    yield reply
                if answer["status"] is not None:
                    ended = True
                    code, details = answer["status"]
                    if code == "OK":
                        return
                    context.abort(grpc.StatusCode[code], details)
        finally:
            with self._lock:
                self._sessions.pop(key, None)
                self._watched.pop(key, None)
            if not ended:  # the edge went away mid-session: free its KV now (fire and forget)
                try:
                    self.handle.close.remote(key, replica=replica)
                except Exception:  # noqa: BLE001 - Ray may be shutting down; the replica's idle reaper frees it then
                    pass

    # -- helpers ----------------------------------------------------------------------------------
    def _call(self, method, *args, timeout_s: float | None = None, **kwargs) -> dict:
        from ray.exceptions import RayError, RayTaskError

        try:
            return method.remote(*args, **kwargs).result(timeout_s=timeout_s or self.options.call_timeout_s)
        except RayTaskError as exc:  # the replica's code raised: a bug there, not a lost replica
            # One line for the edge's status: the cause, not Ray's multi-line traceback text.
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
            lines = str(cause if cause is not None else exc).strip().splitlines()
            what = f"{type(cause).__name__}: {lines[0] if lines else ''}" if cause is not None else \
                (lines[-1] if lines else type(exc).__name__)
            raise SplitLLMError(f"cloud replica failed: {what}") from None
        except (RayError, TimeoutError) as exc:
            raise _Lost(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None

    def _open(self, key: str, first: pb.ClientMessage) -> dict:
        """Admission across replicas: most free KV first, the next one when a replica is full.
        All tries together get OPEN_TIMEOUT_S: admission runs no forward, so a replica that takes
        longer is treated as lost, and a stuck one ends this Open (UNAVAILABLE) at that deadline."""
        message = first.SerializeToString()
        deadline = time.monotonic() + min(OPEN_TIMEOUT_S, self.options.call_timeout_s)
        full: list[str] = []
        lost = 0
        while True:
            try:
                answer = self._call(self.handle.open, key, message, exclude=tuple(full), load=self._load(),
                                    timeout_s=max(deadline - time.monotonic(), 1e-3))
            except _Lost:
                lost += 1  # Serve drops a dead replica from the candidates; try again, boundedly
                pause = 0.05 * lost
                if lost > self.options.max_replicas + 2 or time.monotonic() + pause >= deadline:
                    raise
                time.sleep(pause)
                continue
            status = answer["status"]
            if status is None or status[0] != "RESOURCE_EXHAUSTED":
                return answer
            if answer["replica"] in full:  # every replica has refused: the cluster is full
                answer["status"] = ("RESOURCE_EXHAUSTED", f"all {len(full)} cloud replicas are full; last: {status[1]}")
                return answer
            full.append(answer["replica"])

    def _load(self) -> dict[str, int]:
        """KV bytes this front has reserved on each replica (the router's first ranking key)."""
        with self._lock:
            load: dict[str, int] = {}
            for replica, reserved in self._sessions.values():
                load[replica] = load.get(replica, 0) + reserved
            return load

    def route_overhead(self) -> tuple[float, int]:
        """(seconds, messages) forwarded so far, beyond the replicas' own time on them: what the
        handle, the SessionRouter and Ray's transport cost (the difference of two reads is a run's)."""
        with self._lock:
            return self._route_s, self._routed

    def _count_route(self, seconds: float) -> None:
        with self._lock:
            self._route_s += seconds
            self._routed += 1

    def _refused(self) -> None:
        with self._lock:
            self._counters.sessions_refused += 1

    def _count_in(self, msg: pb.ClientMessage) -> None:
        if msg.WhichOneof("kind") != "step":
            return
        with self._lock:
            self._counters.frame_bytes_in += len(msg.step.payload)
            if msg.step.position == 0 and msg.step.chunk_index == 0 and msg.step.kind == pb.PAYLOAD_HIDDEN:
                self._counters.prompt_tokens += msg.step.n_tokens

    def _count_out(self, reply: pb.ServerMessage) -> None:
        with self._lock:
            self._counters.generated_tokens += reply.WhichOneof("kind") == "token"
            self._counters.reply_bytes_out += reply.ByteSize()


class RayCloudServer(CloudServer):
    """`CloudServer` whose sessions run on Ray Serve replicas: same port, auth, TLS, drain, stop.
    `factory()` builds (split, model sha256) on each replica; `settings` are per replica (their
    api_key is what edges must send; replicas get an internal one)."""

    def __init__(self, factory, settings: CloudSettings, options: RayOptions, address: str = "127.0.0.1:0",
                 credentials=None):
        import secrets

        self.options = options
        self._started_ray = start_ray(options)
        try:
            internal = dataclasses.replace(settings, api_key=secrets.token_hex(16))
            self.handle = deploy(factory, internal, options)
            front = RayFrontServicer(self.handle, settings, options)
            # The front's gRPC threads: one per running session of the whole cluster, plus refusals.
            super().__init__(None, dataclasses.replace(settings, max_sessions=settings.max_sessions *
                                                       options.max_replicas),
                             address=address, credentials=credentials, servicer=front)
        except BaseException:
            self._shutdown_ray()
            raise

    def replica_stats(self) -> dict[str, dict]:
        """Every live replica's own counters (`SplitReplica.stats`) by replica id: each call
        excludes the replicas already heard from, so the router offers a new one until none is left."""
        out: dict[str, dict] = {}
        for _ in range(self.options.max_replicas + 1):
            stats = self.handle.stats.remote(exclude=tuple(out)).result(timeout_s=60)
            if stats["replica"] in out:
                break
            out[stats["replica"]] = stats
        return out

    def stop(self, grace: float | None = 0) -> None:
        try:
            super().stop(grace)
        finally:
            self._shutdown_ray()

    def _shutdown_ray(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        try:
            if self._started_ray:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            if self._started_ray:
                ray.shutdown()
