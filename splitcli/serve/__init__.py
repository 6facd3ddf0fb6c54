"""Serving a split over the network (issue 13): the cloud half as a gRPC service, the edge as its client.

- `proto/split.proto`: the wire protocol, one bidirectional stream per generation session (the
  generated `split_pb2*.py` are checked in; tests/test_serve_proto.py keeps them current).
- `protocol`: what both ends share: settings <-> messages, frame chunking, frame decoding with caps.
- `cloud`: the cloud server core (`CloudServer`, `CloudSettings`): sessions, admission against a
  session limit and KV budget, bearer auth, size limits, drain.
- `state`: what the local servicer and the Ray front share: counters, drain flag, idle reaper.
- `batching`: one thread runs every cloud forward; concurrent decode steps as one batched forward.
- `client`: the edge side (`RemoteCloud`, `generate_remote`): runs the edge half locally and
  streams its frames to the cloud; `handoff`: `generate_remote_handoff` (Fig. 5b over the network).

Imports go down only: serve may use deploy, runtime, model, quant, codec, plan, cost, configio,
units, errors, data; never eval, bench or cli (tests/test_layers.py checks).
"""
