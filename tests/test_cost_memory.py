import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcli.cost.memory import (
    EdgeMemory, b_io_paper, b_kv_paper, edge_kv_bytes, edge_memory, hidden_token_bytes,
    io_bytes_per_step, kv_token_bytes, layer_weight_bits, opsc_weight_bytes,
)
from splitcli.errors import SplitLLMError

TABLE = [{4: 10, 16: 40}, {4: 11, 16: 44}, {4: 12, 16: 48}]


def test_layer_weight_bits_front_and_back():
    assert layer_weight_bits(3, 1, 4, 16, "front") == (4, 16, 16)
    assert layer_weight_bits(3, 1, 4, 16, "back") == (16, 16, 4)
    assert layer_weight_bits(3, 0, 4, None, "front") == (None, None, None)
    assert layer_weight_bits(3, 3, 4, None, "back") == (4, 4, 4)
    with pytest.raises(SplitLLMError):
        layer_weight_bits(3, 4, 4, 16)
    with pytest.raises(SplitLLMError, match="front"):
        layer_weight_bits(3, 1, 4, 16, "middle")  # type: ignore[arg-type]
    assert len(layer_weight_bits(10_000, 0, 4, 8)) == 10_000
    with pytest.raises(SplitLLMError, match=r"n_layers must be an integer in \[1, 10000\]"):
        layer_weight_bits(10**12, 0, 4, 8)  # refused before a 10^12-entry tuple is built


def test_eq1_hand_values():
    assert opsc_weight_bytes(TABLE, 1, 4, 16) == 10 + 44 + 48
    assert opsc_weight_bytes(TABLE, 1, 4, 16, "back") == 40 + 44 + 12
    assert opsc_weight_bytes(TABLE, 0, 4, 16) == 40 + 44 + 48
    assert opsc_weight_bytes(TABLE, 3, 4, 16) == 10 + 11 + 12
    assert opsc_weight_bytes(TABLE, 1, 4, 16, layers=range(2)) == 10 + 44
    assert opsc_weight_bytes(TABLE, 2, 4, None, layers=range(2)) == 10 + 11
    assert opsc_weight_bytes(TABLE, 1, 4, 16, layers=range(0)) == 0


def test_eq1_errors():
    with pytest.raises(SplitLLMError, match="q_w2 is None"):
        opsc_weight_bytes(TABLE, 1, 4, None, layers=range(2))
    with pytest.raises(SplitLLMError, match="8 bits"):
        opsc_weight_bytes(TABLE, 1, 8, 16)
    with pytest.raises(SplitLLMError, match="outside"):
        opsc_weight_bytes(TABLE, 1, 4, 16, layers=range(4))


def test_kv_token_bytes_smollm2():
    # SmolLM2-135M: 3 KV heads x 64 dims; K and V at 16 bits = 2 * 3 * 64 * 2 bytes.
    assert kv_token_bytes(3, 64, 16) == 768
    assert kv_token_bytes(3, 64, 4) == 192
    assert kv_token_bytes(3, 64, 4, overhead_bytes=8) == 200
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(SplitLLMError):
            kv_token_bytes(3, 64, bad)
    with pytest.raises(SplitLLMError):
        kv_token_bytes(0, 64, 16)


def test_edge_kv_bytes():
    assert edge_kv_bytes(100, 10, 3, 64, 16) == 100 * 10 * 768
    assert edge_kv_bytes(3, 2, 3, 64, [16, 8]) == 3 * (768 + 384)
    assert edge_kv_bytes(0, 10, 3, 64, 16) == 0
    assert edge_kv_bytes(5, 0, 3, 64, 16) == 0
    with pytest.raises(SplitLLMError, match="one KV bit width"):
        edge_kv_bytes(3, 2, 3, 64, [16])


def test_eq2_paper_literal():
    # w=3, l=2, HD=4, Q_a = (8, 8, 4): edge 2*(12*8 + 12*8) + cloud 2*(8*4) + HD*Q_a,l = 4*8.
    assert b_kv_paper(3, 2, 4, [8, 8, 4]) == 384 + 64 + 32
    # l = L: no cloud term.
    assert b_kv_paper(1, 3, 4, [8, 8, 4]) == 2 * (4 * 8 + 4 * 8 + 4 * 4) + 4 * 4
    with pytest.raises(SplitLLMError):
        b_kv_paper(0, 1, 4, [8])
    with pytest.raises(SplitLLMError):
        b_kv_paper(1, 4, 4, [8, 8, 4])


def test_eq3_paper_literal():
    assert b_io_paper(3, 2, 0, 4, [8, 8, 4]) == 3 * 4 * 8
    assert b_io_paper(3, 2, 1, 4, [8, 8, 4]) == b_kv_paper(3, 2, 4, [8, 8, 4])
    with pytest.raises(SplitLLMError):
        b_io_paper(3, 2, 2, 4, [8, 8, 4])


def test_eq3_per_step_reading():
    hidden = hidden_token_bytes(576, 16)
    assert hidden == 1152
    cloud_kv = (30 - 10) * kv_token_bytes(3, 64, 16)
    assert io_bytes_per_step(0, 1, hidden) == 1152
    assert io_bytes_per_step(0, 1, hidden, cloud_kv) == 1152  # ignored without KV
    assert io_bytes_per_step(1, 1, hidden, cloud_kv) == 1152 + 20 * 768
    assert io_bytes_per_step(1, 5, 300.0, 10.0) == 5 * 310
    assert io_bytes_per_step(1, 0, 300.0, 10.0) == 0
    with pytest.raises(SplitLLMError):
        io_bytes_per_step(1, 1, math.nan)
    with pytest.raises(SplitLLMError):
        io_bytes_per_step(-1, 1, 1.0)


def test_edge_memory_total():
    mem = edge_memory(TABLE, 2, 1, 4, 16, [768, 768, 768], 100, [5, 7, 1000], embedding_bytes=3)
    assert mem.weights_bytes == 3 + 10 + 44
    assert mem.kv_bytes == 100 * 2 * 768
    assert mem.activation_bytes == 7  # max over edge layers only; layer 2 is on the cloud
    assert mem.total_bytes == 57 + 153600 + 7
    with pytest.raises(SplitLLMError):
        edge_memory(TABLE, 0, 1, 4, 16, [1, 1, 1], 1, [1, 1, 1])
    with pytest.raises(SplitLLMError):
        EdgeMemory(1, -1, 0)
    with pytest.raises(SplitLLMError):
        EdgeMemory(math.inf, 0, 0)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.data())
def test_eq1_partition_property(n_layers, data):
    """Front segment + back segment at one split add up to the whole, for any l_w."""
    table = [{4: data.draw(st.integers(0, 10**9)), 16: data.draw(st.integers(0, 10**9))}
             for _ in range(n_layers)]
    l_w = data.draw(st.integers(0, n_layers))
    whole = opsc_weight_bytes(table, l_w, 4, 16)
    assert whole == sum(t[4] for t in table[:l_w]) + sum(t[16] for t in table[l_w:])
    split = data.draw(st.integers(0, n_layers))
    assert (opsc_weight_bytes(table, l_w, 4, 16, layers=range(split))
            + opsc_weight_bytes(table, l_w, 4, 16, layers=range(split, n_layers))) == whole
