"""int4 weights are portable: what reaches a file never depends on the CPU's vector width.

torch's CPU int4 kernel lays packed weights out by the vector width of the CPU it runs on
(64-row tiles with AVX-512, 32 with AVX2, pairs elsewhere). These tests run the writer and the
reader in subprocesses under every ATEN_CPU_CAPABILITY this host offers and compare bytes and
logits across them.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from splitcli.model.shards import dir_digest, read_manifest
from tests.cpu_capabilities import offered


def _env(cap: str) -> dict[str, str]:
    return {**os.environ, "ATEN_CPU_CAPABILITY": cap}


def _run(cap: str, code: str, *args: str) -> str:
    r = subprocess.run([sys.executable, "-c", code, *args], env=_env(cap), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


@functools.lru_cache(maxsize=1)
def capabilities() -> tuple[str, ...]:
    """The capabilities torch dispatches to here and the CPU can run (tests/cpu_capabilities.py)."""
    return offered()


_EXPORT = """
import hashlib, numpy as np, torch
from torch import nn
from splitcli.quant.modules import Int4Linear
# weights from numpy: torch's own random init is vectorized and differs between capabilities
rng = np.random.default_rng(7)
h = hashlib.sha256()
for n, k, g in [(576, 576, 64), (192, 576, 64), (96, 128, 32), (48, 64, 32)]:
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32)))
        lin.bias.copy_(torch.from_numpy(rng.standard_normal(n, dtype=np.float32)))
    e = Int4Linear.from_linear(lin, g).export()
    for name in sorted(e):
        h.update(name.encode()); h.update(e[name].contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


def test_int4_export_bytes_identical_under_every_capability():
    caps = capabilities()
    assert "default" in caps and len(caps) >= 2, caps  # every x86-64 torch build offers default and avx2
    digests = {cap: _run(cap, _EXPORT) for cap in caps}
    assert len(set(digests.values())) == 1, digests


_WRITE = """
import sys
from pathlib import Path
from splitcli.model.loader import load_model
from splitcli.model.shards import QuantSpec, dir_digest, write_shards
model_dir, out = sys.argv[1], Path(sys.argv[2])
write_shards(load_model(model_dir), Path(model_dir), QuantSpec(2, 4, None, None, "front", 32, 8, 16), out)
print(dir_digest(out))
"""

_READ = """
import copy, json, sys, torch
from pathlib import Path
from splitcli.model.loader import load_model
from splitcli.model.shard_loader import load_cloud, load_edge
from splitcli.model.split import CloudHalf, EdgeHalf, decoder_parts
from splitcli.quant import QuantEmbedding, quantize_layers_
model_dir, shard = sys.argv[1], Path(sys.argv[2])
model = copy.deepcopy(load_model(model_dir).model)
parts = decoder_parts(model)
quantize_layers_(parts.layers, [0, 1], 4, 32)
model.model.embed_tokens = QuantEmbedding.from_embedding(parts.embed_tokens, bits=8)
parts = decoder_parts(model)
ids = torch.randint(0, 49152, (2, 7), generator=torch.Generator().manual_seed(1))
pos = torch.arange(7).expand(2, 7)
with torch.no_grad():
    ref = CloudHalf(parts, 2)(EdgeHalf(parts, 2)(ids, pos, None, None), pos, None, None)
    edge, cloud = load_edge(shard), load_cloud(shard)
    got = cloud.half(edge.half(ids, pos, None, None), pos, None, None)
print(json.dumps({"max_abs_diff": float((got - ref).abs().max()), "greedy_equal": bool(torch.equal(got.argmax(-1), ref.argmax(-1)))}))
"""


def test_shard_written_under_one_capability_loads_under_another(tiny_model_dir, tmp_path):
    caps = capabilities()
    digests = {}
    for cap in caps:
        digests[cap] = _run(cap, _WRITE, str(tiny_model_dir), str(tmp_path / cap))
        assert dir_digest(tmp_path / cap) == digests[cap]
    assert len(set(digests.values())) == 1, digests  # byte-identical shard directories
    assert read_manifest(tmp_path / caps[0]).layer_bits[:2] == (4, 4)  # int4 layers: the kernel path is used
    # every reader against its own in-memory quantized model, on shards from another writer
    for i, reader in enumerate(caps):
        writer = caps[(i + 1) % len(caps)]
        got = json.loads(_run(reader, _READ, str(tiny_model_dir), str(tmp_path / writer)))
        assert got == {"max_abs_diff": 0.0, "greedy_equal": True}, (writer, reader, got)


_ROWS8 = """
import numpy as np, torch
from types import SimpleNamespace
from torch import nn
from splitcli.codec.predictive import embedding_crc
from splitcli.deploy.predictive import codec_embeddings
# a table with wide, constant, tiny and huge rows: the predictive codec predicts from its 8-bit rows
rng = np.random.default_rng(11)
w = rng.standard_normal((300, 96), dtype=np.float32) * rng.uniform(1e-3, 50, (300, 1)).astype(np.float32)
w[0], w[1], w[2] = 0.0, 3.25, np.linspace(-6e4, 6e4, 96, dtype=np.float32)
emb = nn.Embedding(300, 96)
with torch.no_grad():
    emb.weight.copy_(torch.from_numpy(w))
held = SimpleNamespace(model=SimpleNamespace(get_input_embeddings=lambda: emb))
rows = codec_embeddings(held, "rows8")
# the codec reads the rows through numpy: the same floats as torch's dequantizer of the module
from splitcli.quant import QuantEmbedding
from splitcli.quant.rtn import dequantize_groupwise
q = QuantEmbedding.from_embedding(emb, bits=8)
ref = dequantize_groupwise(q.codes, q.scales, q.zeros, 8)
assert torch.equal(rows[torch.arange(300)], ref) and torch.equal(rows[torch.tensor([2, 0, 2])], ref[[2, 0, 2]])
print(embedding_crc(rows))
"""


def test_predictive_codec_rows_are_the_same_floats_under_every_capability():
    """An edge and a cloud on different CPUs build the predictive codec's table from the same 8-bit
    codes: a different rounding of the rows would change its crc and every session would be refused."""
    caps = capabilities()
    assert "default" in caps and len(caps) >= 2, caps
    digests = {cap: _run(cap, _ROWS8) for cap in caps}
    assert len(set(digests.values())) == 1, digests
