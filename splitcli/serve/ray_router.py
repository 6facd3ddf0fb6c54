"""Session affinity on Ray Serve: a custom `RequestRouter` (ray.serve.request_router, Ray >= 2.46).

Why this API level: a split session is stateful (its replica holds the KV cache of layers
[ℓ, L)), so every step must reach one named replica. Serve's public handle API has no "call that
replica" (`DeploymentHandle` picks replicas itself: power of two choices), and calling the replica
actors directly would bypass Serve's health checks, restarts, autoscaling and queue-length
bookkeeping. The request-router extension point is the level Serve offers for this: the router
sees each request's arguments (`PendingRequest.kwargs`) and the live replicas (`RunningReplica`,
with the `routing_stats` each replica reports), and returns them ranked. It is marked alpha in
Ray (its signature may change), which is why it is pinned in the `ray` extra and kept to one
small class here. Consistent hashing would not do: a session must stay where its KV is even when
replicas come and go, and a new session must go where there is KV room, not where a hash says.

The front (serve/ray_backend.py) passes the routing facts as keyword arguments:
- `replica=ID`: a step of an admitted session goes to that replica only. If it is gone (died,
  scaled down), any live replica takes the call and answers UNAVAILABLE ("not held here"), so the
  edge reconnects and rebuilds the session by replaying its hidden states (serve/client.py).
- `exclude=(ID, ...)`: an Open skips replicas that already refused it as full; the others are
  tried least loaded first: by the KV this front has reserved on each (`load={ID: bytes}`, exact
  and current), then by the free KV each replica last reported (`SplitReplica.record_routing_stats`,
  polled every second: it also counts other fronts' sessions, but lags a burst of Opens). When
  every replica is excluded they are all offered again: the one that answers refuses once more,
  and the front then knows the whole cluster is full (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def _kv_free(replica: RunningReplica) -> float:
    stats = replica.routing_stats or {}
    return float(stats.get("kv_free", 0))


class SessionRouter(RequestRouter):
    """Pins a session's steps to the replica holding its KV; new sessions go where KV is free."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        pinned = kwargs.get("replica")
        if pinned:
            for r in candidate_replicas:
                if r.replica_id.unique_id == pinned:
                    return [[r]]
            return [list(candidate_replicas)]  # its holder is gone: whoever answers says so
        excluded = set(kwargs.get("exclude") or ())
        load = kwargs.get("load") or {}
        fresh = [r for r in candidate_replicas if r.replica_id.unique_id not in excluded]

        def order(r: RunningReplica):
            return load.get(r.replica_id.unique_id, 0), -_kv_free(r)

        # One rank per replica, least loaded first: Serve tries the ranks in order (a rank with
        # several replicas would let it pick by queue length instead).
        return [[r] for r in sorted(fresh or candidate_replicas, key=order)]
