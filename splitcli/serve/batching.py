"""Continuous batching for the cloud half: decode steps of concurrent sessions in one forward.

Each session owns a cache of its own length. A batch of one-token decode steps is run as one
forward by stacking the sessions' caches, left-padded to the longest, with an attention mask that
hides the padding and each row's own position id (the same left-padding convention as
`runtime.session`: position = real tokens before this one). The new rows are then cut back into
each session's cache without the padding, so a session's cache never depends on who it was batched
with. A single step (and every prefill) runs on the session's cache directly, with no mask, exactly
as the in-process split does, so an unbatched session is bit-identical to `generate`. The cloud half
is the eager `CloudHalf` (Hugging Face caches, `forward_batch`) or the fast one (static caches,
`batching_fast.forward_batch_fast`); a Batcher runs one kind only.

Stacking copies every cache each batched step: O(batch x length x cloud layers) memory traffic,
correct first; a paged cache shared across sessions is the faster layout (issue 13's benchmark
will tell whether it is needed). Models whose cloud layers are not all full attention, or whose
cache layers are not plain `DynamicLayer`s, run their decode steps one after another instead.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from splitcli.errors import SplitLLMError
from splitcli.model.fast import row_major_head
from splitcli.model.split import CloudHalf, new_cache
from splitcli.serve.batching_fast import check_cache, forward_batch_fast, is_fast


@dataclass
class CloudState:
    """One session's cloud-side state: its cache and how many positions it holds."""

    cache: object
    length: int = 0
    closed: bool = False
    done_at: float | None = None  # when its last step's logits were handed back (time.monotonic)
    gap_s: float | None = None    # running mean: its answer -> its next decode step (edge + network)


@dataclass
class _Work:
    state: CloudState
    hidden: torch.Tensor  # [1, T, H]
    top: int = 0  # `Session.forward`'s: a step run alone may screen its head (a batch of several does not)
    done: threading.Event = field(default_factory=threading.Event)
    logits: torch.Tensor | None = None  # [V] of the last position
    error: BaseException | None = None


def can_batch(cloud: CloudHalf) -> bool:
    """Stacked caches are valid when every cloud layer is full attention (no sliding windows)."""
    types = cloud.parts.layer_types[cloud.split_layer:]
    return all(t == "full_attention" for t in types)


def forward_one(cloud: CloudHalf, state: CloudState, hidden: torch.Tensor, top: int = 0) -> torch.Tensor:
    """Positions [length, length + T) of one session on its own cache (no mask: as in-process).
    `cloud` is the eager `CloudHalf` or the fast one (`model.fast.FastCloudHalf`, same call) with
    the cache kind it makes; `top` as `Session.forward`'s."""
    check_cache(cloud, state.cache)
    t = hidden.shape[1]
    positions = torch.arange(state.length, state.length + t)[None]
    logits = cloud(hidden, positions, None, state.cache, logits_to_keep=1, top=top)
    state.length += t
    return logits[0, -1]


def _cloud_layers(cloud: CloudHalf, cache):
    return [cache.layers[i] for i in range(cloud.split_layer, cloud.parts.num_layers)]


def forward_batch(cloud: CloudHalf, states: list[CloudState], hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """One-token steps of several sessions (each with a non-empty cache) as one forward.
    Returns each session's logits [V]; each session's cache grows by its own row only. The fast
    half's counterpart is `batching_fast.forward_batch_fast`."""
    from transformers.cache_utils import DynamicLayer

    lengths = [s.length for s in states]
    longest = max(lengths)
    b = len(states)
    batch_cache = new_cache(cloud.parts)
    per_session = [_cloud_layers(cloud, s.cache) for s in states]
    for j, layer_idx in enumerate(range(cloud.split_layer, cloud.parts.num_layers)):
        layers = [p[j] for p in per_session]
        if not all(type(layer) is DynamicLayer and layer.get_seq_length() == n for layer, n in zip(layers, lengths)):
            raise SplitLLMError("batched decode needs plain full-attention caches of the sessions' lengths")
        keys = [torch.nn.functional.pad(layer.keys, (0, 0, longest - n, 0)) for layer, n in zip(layers, lengths)]
        values = [torch.nn.functional.pad(layer.values, (0, 0, longest - n, 0)) for layer, n in zip(layers, lengths)]
        batch_cache.update(torch.cat(keys), torch.cat(values), layer_idx)
    mask = torch.zeros(b, longest + 1, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, longest - n:] = 1
    positions = torch.tensor(lengths)[:, None]
    logits = cloud(torch.cat(hidden), positions, mask, batch_cache, logits_to_keep=1)  # [B, 1, V]
    # Cut each session's rows back out (its own length + the new one), dropping the padding.
    for j, layer_idx in enumerate(range(cloud.split_layer, cloud.parts.num_layers)):
        stacked = batch_cache.layers[layer_idx]
        for i, n in enumerate(lengths):
            own = per_session[i][j]
            own.keys = stacked.keys[i:i + 1, :, longest - n:].clone()
            own.values = stacked.values[i:i + 1, :, longest - n:].clone()
    for s in states:
        s.length += 1
    return [logits[i, -1] for i in range(b)]


class Batcher:
    """One thread runs every forward of the cloud half. Decode steps that arrive within `window_s`
    of the first are run together (up to `max_batch`); prefills run alone. Callers block in `run`.

    Stragglers: sessions whose last step was answered and whose next one is expected soon (its
    answer time + its own mean gap between an answer and its next step, i.e. its edge's compute
    and the network, with a quarter of slack) are waited for, up to `straggler_s` after the first step (default:
    the last forward's duration). Without it, sessions that missed one forward come back together
    while the others' forward runs, and the two groups alternate for good (half the batch, twice
    the forwards); waiting less than one forward for them costs the early steps at most what the
    second forward would, and saves its fixed cost."""

    def __init__(self, cloud: CloudHalf, window_s: float = 0.002, max_batch: int = 16,
                 active: Callable[[], int] | None = None, straggler_s: float | None = None):
        self.cloud = cloud
        self.window_s = window_s
        self.max_batch = max_batch
        self.straggler_s = straggler_s
        self.last_forward_s: float | None = None
        self._out: dict[int, CloudState] = {}  # answered sessions whose next step has not come yet
        self._out_lock = threading.Lock()
        # How many sessions could be waiting: once that many steps are in, waiting longer only
        # adds latency (a lone session never waits out the window).
        self.active = active or (lambda: max_batch)
        self.batchable = can_batch(cloud)
        self._forward_batch = forward_batch
        if is_fast(cloud):
            # The fast half's head layout is the batch-1 one; batched steps get their own copy.
            head_rows = row_major_head(cloud.parts) if self.batchable and max_batch > 1 else None
            self._forward_batch = functools.partial(forward_batch_fast, head_rows=head_rows)
        # Observability in constant memory (a server runs for months): totals, the largest batch
        # and a hook that sees every batch size (the metrics histogram), never an ever-growing list.
        self.forwards = 0  # cloud forwards run
        self.batched_steps = 0  # session steps they served
        self.largest_batch = 0
        self.on_batch: Callable[[int], None] | None = None
        self._queue: queue.Queue[_Work] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="splitllm-cloud-batcher", daemon=True)
        self._thread.start()

    def run(self, state: CloudState, hidden: torch.Tensor, timeout_s: float = 300.0, top: int = 0) -> torch.Tensor:
        """Logits [V] of the last of `hidden`'s [1, T, H] positions, appended to `state`. `top` > 0:
        the caller reads only the `top` largest (`Session.forward`), so a step that runs alone may
        return -inf for the rest."""
        work = _Work(state, hidden, top)
        with self._out_lock:
            self._out.pop(id(state), None)
            if state.done_at is not None and self._decodable_shape(work):
                gap = min(time.monotonic() - state.done_at, 1.0)
                state.gap_s = gap if state.gap_s is None else 0.8 * state.gap_s + 0.2 * gap
            # Queued under the same lock: a step is always either expected (in _out) or queued,
            # never neither while a batch is being formed (it would run alone, out of step).
            self._queue.put(work)
        deadline = time.monotonic() + timeout_s
        while not work.done.wait(0.05):
            if self._stop.is_set():
                raise SplitLLMError("the cloud server is shutting down")
            if time.monotonic() > deadline:
                raise SplitLLMError(f"the cloud forward did not finish within {timeout_s:g} s")
        if work.error is not None:
            raise work.error
        return work.logits  # type: ignore[return-value]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        carry: list[_Work] = []
        while not self._stop.is_set():
            if carry:
                first = carry.pop(0)
            else:
                try:
                    first = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
            batch = [first]
            if self._decodable(first):
                start = time.monotonic()
                while len(batch) < min(self.max_batch, self.active()):
                    deadline = max(start + self.window_s, self._stragglers_due(start))
                    remaining = deadline - time.monotonic()
                    try:  # past the deadline, still take what is already queued
                        item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                    except queue.Empty:
                        break
                    (batch if self._decodable(item) else carry).append(item)
            self._execute(batch)

    def _stragglers_due(self, start: float) -> float:
        """Until when to wait for answered sessions expected back within the straggler limit
        (0: none is)."""
        cap = self.straggler_s if self.straggler_s is not None else self.last_forward_s
        if not cap:
            return 0.0
        limit = start + cap
        with self._out_lock:  # ended sessions are dropped from _out after each forward (_execute)
            # each session at its own pace, with a quarter of slack (paces jitter)
            due = [st.done_at + 1.25 * st.gap_s + 0.001 for st in self._out.values()
                   if st.gap_s is not None and not st.closed]
        due = [t for t in due if t <= limit]
        return min(limit, max(due) + 0.001) if due else 0.0

    def _decodable(self, work: _Work) -> bool:
        return self.batchable and self._decodable_shape(work) and work.state.length > 0

    @staticmethod
    def _decodable_shape(work: _Work) -> bool:
        return work.hidden.shape[1] == 1

    def _execute(self, batch: list[_Work]) -> None:
        live = [w for w in batch if not w.state.closed]
        for w in batch:
            if w.state.closed:
                w.error = SplitLLMError("the session was closed")
                w.done.set()
        if not live:
            return
        self.forwards += 1
        self.batched_steps += len(live)
        self.largest_batch = max(self.largest_batch, len(live))
        if self.on_batch is not None:
            self.on_batch(len(live))
        started = time.monotonic()
        try:
            if len(live) == 1:
                live[0].logits = forward_one(self.cloud, live[0].state, live[0].hidden, live[0].top)
            else:
                out = self._forward_batch(self.cloud, [w.state for w in live], [w.hidden for w in live])
                for w, logits in zip(live, out):
                    w.logits = logits
            now = time.monotonic()
            if all(self._decodable_shape(w) for w in live):  # a prefill's time says nothing of a decode's
                self.last_forward_s = now - started
            with self._out_lock:
                for w in live:
                    w.state.done_at = now
                    self._out[id(w.state)] = w.state
                for key in [k for k, st in self._out.items() if st.closed]:  # ended sessions: let them go
                    del self._out[key]
        except Exception as exc:  # noqa: BLE001 - this thread serves every session: it must not die
            # A forward that fails fails its own steps (e.g. a session reaped mid-batch); the
            # thread keeps serving the others. The error travels to each waiting caller.
            for w in live:
                w.error = exc if isinstance(exc, SplitLLMError) else SplitLLMError(
                    f"cloud forward failed: {type(exc).__name__}: {exc}")
        finally:
            for w in live:
                w.done.set()
