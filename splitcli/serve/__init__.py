"""Serving a split over the network (issue 13): the cloud half as a gRPC service, the edge as its client.

- `proto/split.proto`: the wire protocol, one bidirectional stream per generation session (the
  generated `split_pb2*.py` are checked in; tests/test_serve_proto.py keeps them current).
- `cloud`: the cloud server core: sessions, admission, auth, limits, continuous batching.
- `client`: the edge side: runs the edge half locally and streams its frames to the cloud.

Imports go down only: serve may use deploy, runtime, model, quant, codec, plan, cost, configio,
units, errors, data; never eval, bench or cli (tests/test_layers.py checks).
"""
