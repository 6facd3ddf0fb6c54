"""The Ray front (`RayFrontServicer`) over real gRPC on 127.0.0.1, without a Ray cluster: its
DeploymentHandle is a fake that calls one real `SplitReplica` (tiny model) in this process, and
can be told to fail or hang the way a Ray replica does. What is tested is the front's own code:
how it reports a replica's error, bounds an Open that a stuck replica never answers, and frees
a silent edge. Ray itself (a local instance, real replicas) is tested in test_serve_ray.py."""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'splitllm[ray]'")

from ray.exceptions import GetTimeoutError, RayTaskError  # noqa: E402

from conftest import _tiny  # noqa: E402
from splitcli.deploy import SplitSpec, build_split  # noqa: E402
from splitcli.runtime.generate import SamplingConfig  # noqa: E402
from splitcli.serve import ray_backend  # noqa: E402
from splitcli.serve.client import RemoteCloud, open_message  # noqa: E402
from splitcli.serve.cloud import CloudServer, CloudSettings  # noqa: E402
from splitcli.serve.proto import split_pb2 as pb  # noqa: E402
from splitcli.serve.proto import split_pb2_grpc as pb_grpc  # noqa: E402
from splitcli.serve.ray_backend import RayFrontServicer, RayOptions  # noqa: E402
from splitcli.serve.ray_replica import SplitReplica  # noqa: E402

SHA = "0" * 63 + "3"
KEY = "front-key"
HANG_TOKENS = 31  # an Open asking for this many tokens hangs in the fake (a stuck replica)
FAIL_TOKENS = 29  # ... and one asking for this many raises in the replica


@pytest.fixture(scope="module")
def split():
    lm = SimpleNamespace(model=_tiny("llama"), tokenizer=None, sha256=SHA)
    return build_split(lm, SplitSpec(split_layer=2, wire="fp16"))


def _task_error(where: str) -> RayTaskError:
    """What Ray raises when a replica's method raised: its traceback text spans lines."""
    return RayTaskError(where, "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                               "ValueError: boom in the replica", ValueError("boom in the replica"))


class FakeHandle:
    """`DeploymentHandle` stand-in: `handle.open.remote(...).result(timeout_s=...)` runs the real
    replica's method on a thread and waits as Ray does (GetTimeoutError past the timeout)."""

    def __init__(self, replica: SplitReplica):
        self.replica = replica
        self.release = threading.Event()  # lets hung calls end at teardown
        self.fail_feed = False
        self.opens: list[int] = []
        self.closed: list[str] = []
        self._pool = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="fake-ray")
        self.open = self._method(self._open)
        self.feed = self._method(self._feed)
        self.close = self._method(self._close)

    def _method(self, fn):
        pool = self._pool

        class Result:
            def __init__(self, fut):
                self.fut = fut

            def result(self, timeout_s=None):
                try:
                    return self.fut.result(timeout=timeout_s)
                except futures.TimeoutError:
                    raise GetTimeoutError(f"timed out after {timeout_s} s") from None

        return SimpleNamespace(remote=lambda *a, **kw: Result(pool.submit(fn, *a, **kw)))

    def _open(self, key, message, exclude=(), load=None):
        max_tokens = pb.ClientMessage.FromString(message).open.max_tokens
        self.opens.append(max_tokens)
        if max_tokens == HANG_TOKENS:
            self.release.wait(60)
            raise RuntimeError("released")
        if max_tokens == FAIL_TOKENS:
            raise _task_error("SplitReplica.open")
        return self.replica.open(key, message, exclude=exclude, load=load)

    def _feed(self, key, message, replica=""):
        if self.fail_feed:
            raise _task_error("SplitReplica.feed")
        return self.replica.feed(key, message, replica=replica)

    def _close(self, key, replica=""):
        self.closed.append(key)
        self.replica.close(key, replica=replica)

    def shutdown(self):
        self.release.set()
        self._pool.shutdown(wait=True)


@pytest.fixture
def front(split):
    """(server, fake handle): the front served on 127.0.0.1 at a free port, one fake replica."""
    settings = CloudSettings(model_sha256="-", api_key=KEY, idle_timeout_s=0.6)
    replica = SplitReplica(lambda: (split, SHA), CloudSettings(model_sha256="-", api_key="internal"))
    handle = FakeHandle(replica)
    server = CloudServer(None, settings, servicer=RayFrontServicer(handle, settings, RayOptions()))
    try:
        yield server, handle
    finally:
        handle.release.set()
        server.stop(0)
        handle.shutdown()
        replica.servicer.close()


class Edge:
    """One raw SplitCloud stream: `send` messages, `recv` replies; `status` once it ended."""

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._out: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        self.status: tuple[grpc.StatusCode, str] | None = None
        call = pb_grpc.SplitCloudStub(self.channel).Session(iter(self._out.get, None),
                                                            metadata=(("authorization", f"Bearer {KEY}"),))
        self._thread = threading.Thread(target=self._read, args=(call,), daemon=True)
        self._thread.start()

    def _read(self, call):
        try:
            for reply in call:
                self._replies.put(reply)
            self.status = (grpc.StatusCode.OK, "")
        except grpc.RpcError as exc:
            self.status = (exc.code(), exc.details())
        self._replies.put(None)

    def send(self, msg: pb.ClientMessage) -> None:
        self._out.put(msg)

    def recv(self, timeout: float = 30):
        return self._replies.get(timeout=timeout)

    def wait_end(self, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
        self._thread.join(timeout)
        return self.status

    def close(self) -> None:
        self._out.put(None)
        self.channel.close()
        self._thread.join(10)


def _open_msg(split, max_tokens=16):
    cloud = RemoteCloud(target="-", api_key="-", model_sha256=SHA)
    return open_message(split, cloud, max_tokens, SamplingConfig())


def test_a_replica_error_reaches_the_edge_as_internal_one_line(front, split):
    server, handle = front
    edge = Edge(server.port)
    try:
        edge.send(_open_msg(split))
        assert edge.recv().opened.admitted
        handle.fail_feed = True
        edge.send(pb.ClientMessage(step=pb.Step(step_id=0, position=0, n_tokens=1, payload=b"x")))
        code, details = edge.wait_end()
        assert code == grpc.StatusCode.INTERNAL, (code, details)
        assert "\n" not in details and "Traceback" not in details and "boom in the replica" in details
        # the session the replica may still hold is released: the front asked it to close
        deadline = time.monotonic() + 10
        while (handle.closed == [] or server.servicer.session_count or handle.replica.servicer.session_count) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(handle.closed) == 1 and server.servicer.session_count == 0
        assert handle.replica.servicer.session_count == 0
        # an Open the replica raises on: the same, and the front holds nothing for it
        failed = Edge(server.port)
        failed.send(_open_msg(split, max_tokens=FAIL_TOKENS))
        code, details = failed.wait_end()
        failed.close()
        assert code == grpc.StatusCode.INTERNAL and "\n" not in details and "boom in the replica" in details
        assert server.servicer.session_count == 0 and server.servicer.kv_used == 0
    finally:
        edge.close()


def test_a_stuck_replica_does_not_hold_other_opens(front, split, monkeypatch):
    monkeypatch.setattr(ray_backend, "OPEN_TIMEOUT_S", 2.0)
    server, handle = front
    stuck, other = Edge(server.port), Edge(server.port)
    try:
        started = time.monotonic()
        stuck.send(_open_msg(split, max_tokens=HANG_TOKENS))
        while not handle.opens and time.monotonic() - started < 10:
            time.sleep(0.01)
        asked = time.monotonic()
        other.send(_open_msg(split))
        assert other.recv(timeout=30).opened.admitted
        assert time.monotonic() - asked < 1.6  # not behind the stuck Open's whole wait
        code, details = stuck.wait_end(30)
        waited = time.monotonic() - started
        assert code == grpc.StatusCode.UNAVAILABLE and "no cloud replica could take the session" in details
        assert waited < 2.0 + 1.5, waited  # one deadline for all of the Open's tries
    finally:
        stuck.close()
        other.close()


def test_a_silent_edge_is_freed_after_the_idle_timeout(front, split):
    server, handle = front  # idle_timeout_s = 0.6
    admitted, mute = Edge(server.port), Edge(server.port)  # mute: authenticated, never sends its Open
    try:
        admitted.send(_open_msg(split))
        assert admitted.recv().opened.admitted
        deadline = time.monotonic() + 5
        while server.servicer.waiting_count != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.servicer.session_count == 1 and server.servicer.waiting_count == 1
        assert server.servicer.kv_used > 0
        started = time.monotonic()
        # both streams end (the front's gRPC workers are free again) within the timeout + the
        # reaper's period, and the session's entry and reservation with them
        assert admitted.wait_end(5)[0] == grpc.StatusCode.CANCELLED
        assert mute.wait_end(5)[0] == grpc.StatusCode.CANCELLED
        assert time.monotonic() - started < 0.6 + 1.5
        assert server.servicer.session_count == 0 and server.servicer.waiting_count == 0
        assert server.servicer.kv_used == 0
        # the replica is told to free it (fire and forget; its own reaper would, later)
        deadline = time.monotonic() + 10
        while (not handle.closed or handle.replica.servicer.session_count) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(handle.closed) == 1 and handle.replica.servicer.session_count == 0
    finally:
        admitted.close()
        mute.close()


def test_a_busy_session_is_not_reaped(front, split):
    """A step the replica takes longer than the idle timeout to answer is not idle time."""
    server, handle = front  # idle_timeout_s = 0.6
    slow = handle._feed

    def feed(key, message, replica=""):
        time.sleep(1.5)
        return slow(key, message, replica)

    handle.feed = handle._method(feed)
    edge = Edge(server.port)
    try:
        edge.send(_open_msg(split))
        assert edge.recv().opened.admitted
        edge.send(pb.ClientMessage(close=pb.Close()))
        assert edge.wait_end(10) == (grpc.StatusCode.OK, "")
        assert handle.closed == []  # ended by its Close, not by the reaper
    finally:
        edge.close()


# A child that starts a grandchild of its own when told to (a line on stdin) and prints its pid.
_PARENT = ("import subprocess, sys, time\n"
           "sys.stdin.readline()\n"
           "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
           "print(p.pid, flush=True)\n"
           "time.sleep(60)\n")


def _parent():
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _grandchild(parent) -> int:
    parent.stdin.write("go\n")
    parent.stdin.flush()
    return int(parent.stdout.readline())


def _failing_init(started: list, grandchildren: list, bystander, fail_times: int):
    """A ray.init that starts a child with a grandchild (as a real one starts its GCS and the GCS
    its workers) and raises, `fail_times` times; meanwhile a child that was running before it
    (`bystander`, not Ray's) starts a grandchild of its own."""

    def init(**kwargs):
        if not grandchildren:
            grandchildren.append(_grandchild(bystander))
        if len(started) < fail_times:
            started.append(_parent())
            grandchildren.append(_grandchild(started[-1]))
            raise Exception("The current node timed out during startup.")  # what Ray raises

    return init


@pytest.mark.parametrize("fail_times", [1, 2])
def test_a_failed_local_start_is_cleared_and_tried_once_more(monkeypatch, fail_times):
    import psutil
    import ray

    started: list = []
    grandchildren: list = []
    bystander = _parent()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "init", _failing_init(started, grandchildren, bystander, fail_times))
    try:
        if fail_times < ray_backend.LOCAL_START_TRIES:
            assert ray_backend.start_ray(RayOptions()) is True
        else:
            with pytest.raises(ray_backend.SplitLLMError, match="could not start a local Ray instance after 2 tries"):
                ray_backend.start_ray(RayOptions())
        assert len(started) == fail_times
        # every process tree a failed try started is gone (its root reaped: poll() has a status) ...
        assert all(p.poll() is not None for p in started)
        for pid in grandchildren[1:]:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        # ... and what was running before, with what it started since, is not Ray's: left alone
        assert bystander.poll() is None and psutil.Process(grandchildren[0]).status() != psutil.STATUS_ZOMBIE
    finally:
        for p in (*started, bystander):
            for c in psutil.Process(p.pid).children(recursive=True) if p.poll() is None else ():
                c.kill()
            p.kill()
            p.wait()
