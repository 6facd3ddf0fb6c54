"""The token-predictive wire (frame format 4) in a deployment: fitted once, cached, run by a session."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from splitcli.deploy import SplitSpec, build_wire
from splitcli.deploy.calibrate import cache_dir
from splitcli.deploy.predictive import codec_embeddings, default_table, dense_table, fit_slices, fitted_predictive
from splitcli.errors import SplitLLMError
from splitcli.quant import QuantEmbedding
from splitcli.runtime.codec_wire import PredictiveWire
from splitcli.runtime.session import SplitSession
from splitcli.runtime.wire import RawWire
from test_deploy_calibrate import CharTokenizer, write_wikitext


@pytest.fixture(scope="module")
def llama():
    from conftest import _tiny

    return _tiny("llama")


def test_fitted_once_cached_and_refitted_when_corrupt(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data")
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    logs = []
    pc, emb, info = fitted_predictive(lm, 2, data, logs.append)
    assert info["cache"] == "miss" and info["fit_seqlen"] == 256 and info["fit_windows"] == 11   # tiny context
    assert [m.split(": ")[1] for m in logs[1:-1]] == [f"{k}/11 windows" for k in (3, 6, 9, 11)]   # quarters
    assert len(logs) == 6
    pc2, _, info2 = fitted_predictive(lm, 2, data, logs.append)
    assert info2["cache"] == "hit" and pc2.crc == pc.crc and len(logs) == 6
    assert fitted_predictive(lm, 3, data)[2]["cache"] == "miss"                       # ℓ is in the key
    path = cache_dir() / info["path"].split("/")[-1]
    path.write_bytes(b"junk")
    pc3, _, info3 = fitted_predictive(lm, 2, data)
    assert info3["cache"] == "miss" and pc3.crc == pc.crc


def test_split_session_over_the_predictive_wire(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data")
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    wire = build_wire(SplitSpec(split_layer=2, wire="predictive"), lm, data)
    assert isinstance(wire, PredictiveWire) and wire.name == "predictive"
    ids = torch.tensor([CharTokenizer()("the mill was settled by farmers and a river")["input_ids"]])
    ref, got = SplitSession(llama, 2, RawWire("fp32")), SplitSession(llama, 2, wire)
    a = [ref.forward(ids[:, :30], logits_to_keep=0)]
    b = [got.forward(ids[:, :30], logits_to_keep=0)]
    for t in range(30, ids.shape[1]):                         # decode steps: one-token frames
        a.append(ref.forward(ids[:, t:t + 1], logits_to_keep=0))
        b.append(got.forward(ids[:, t:t + 1], logits_to_keep=0))
    a, b = torch.cat(a, 1), torch.cat(b, 1)
    assert float((a - b).norm() / a.norm()) < 0.2                # lossy, but close
    assert len(wire.frame_bytes) == 1 + ids.shape[1] - 30
    # the decode steps predicted from the right previous token: each frame carries it
    from splitcli.codec.predictive import frame_tokens
    frame = wire.encode(torch.zeros(1, 64), ids=ids[0, 31:32], prev_id=int(ids[0, 30]))
    assert frame_tokens(frame).tolist() == [int(ids[0, 31])]


def test_the_stated_target_error_reaches_the_fit(llama, tmp_path, monkeypatch):
    from splitcli.plan.codec_settings import DEFAULT_PREDICTIVE_TARGET_REL_ERROR, CodecSettings

    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data")
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    default = build_wire(SplitSpec(split_layer=2, wire="predictive"), lm, data)
    coarse = build_wire(SplitSpec(split_layer=2, wire="predictive", codec=CodecSettings(target_rel_error=0.3)), lm, data)
    assert default.pc.info["target_rel_error"] == DEFAULT_PREDICTIVE_TARGET_REL_ERROR == 0.175
    assert coarse.pc.info["target_rel_error"] == 0.3 and default.pc.shape is not None   # shaped by the cloud's Fisher
    assert abs(coarse.pc.info["rel_error_fit"] - 0.3) < 1e-3 and coarse.pc.step > default.pc.step


def test_predictive_wire_refuses_what_it_cannot_do(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data")
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    pc, emb, _ = fitted_predictive(lm, 2, data)
    wire = PredictiveWire(pc, emb)
    with pytest.raises(SplitLLMError, match="token ids"):
        wire.encode(torch.zeros(2, 64))
    with pytest.raises(SplitLLMError, match="other input embeddings"):
        PredictiveWire(pc, dense_table(emb) + 1)
    four = SimpleNamespace(model=SimpleNamespace(get_input_embeddings=lambda: QuantEmbedding.from_embedding(
        llama.get_input_embeddings(), bits=4)))
    with pytest.raises(SplitLLMError, match="at 4 bits .*8-bit rows of one group per row"):
        codec_embeddings(four, "rows8")
    with pytest.raises(SplitLLMError, match="must be one of rows8, exact"):
        codec_embeddings(lm, "rows4")


def test_the_codec_table_is_the_8_bit_rows_an_edge_shard_holds(llama, monkeypatch):
    """A float model and an edge holding `quantize`'s 8-bit rows give the codec the same table to the
    bit (so their crc agrees) without the edge making a float copy; "exact" is the float table."""
    from splitcli.codec.predictive import embedding_crc

    lm = SimpleNamespace(model=llama)
    rows = QuantEmbedding.from_embedding(llama.get_input_embeddings(), bits=8)
    edge = SimpleNamespace(model=SimpleNamespace(get_input_embeddings=lambda: rows))
    assert default_table(lm) == default_table(edge) == "rows8"
    full, held = codec_embeddings(lm, "rows8"), codec_embeddings(edge, "rows8")
    assert not isinstance(held, torch.Tensor) and held.shape == (128, 64)
    assert torch.equal(dense_table(full), dense_table(held)) and embedding_crc(full) == embedding_crc(held)
    with torch.no_grad():                                 # the rows the edge's own forward embeds with
        assert torch.equal(dense_table(held), rows(torch.arange(128)))
    exact = codec_embeddings(lm, "exact")
    assert torch.equal(exact, llama.get_input_embeddings().weight)
    assert 0 < (dense_table(full) - exact).abs().max() < 0.01 * exact.abs().max()   # 8-bit rows: close, not equal
    # the crc reads the table in blocks (here of 5 rows, a last one short): the same as all at once
    import zlib

    from splitcli.codec import predictive
    monkeypatch.setattr(predictive, "_CRC_ROWS", 5)
    assert embedding_crc(exact) == zlib.crc32(exact.numpy().tobytes())
    assert embedding_crc(held) == zlib.crc32(dense_table(full).numpy().tobytes())
    with pytest.raises(SplitLLMError, match="exact table .*refit it"):
        codec_embeddings(edge, "exact")


def test_a_codec_file_from_before_the_8_bit_rows_runs_on_the_float_table(llama, tmp_path, monkeypatch):
    """Files written before the choice record no table: they predict from the exact float table, so
    an edge holding it runs them and an 8-bit edge refuses them with advice."""
    import dataclasses

    from splitcli.codec.predictive import PredictiveCodec, embedding_crc
    from splitcli.deploy.predictive import predictive_from_file

    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    pc, _, _ = fitted_predictive(lm, 2, write_wikitext(tmp_path / "data"))
    info = {k: v for k, v in pc.info.items() if k != "table"}
    exact = llama.get_input_embeddings().weight.detach()
    path = tmp_path / "old.npz"
    dataclasses.replace(pc, info=info, emb_crc=embedding_crc(exact)).save(path)
    assert "table" not in PredictiveCodec.load(path).info
    old, emb, _ = predictive_from_file(path, lm, 2)
    assert isinstance(emb, torch.Tensor) and torch.equal(emb, exact)
    PredictiveWire(old, emb)                                  # the crc of the float table: accepted
    rows = QuantEmbedding.from_embedding(llama.get_input_embeddings(), bits=8)
    edge = SimpleNamespace(model=SimpleNamespace(get_input_embeddings=lambda: rows))
    with pytest.raises(SplitLLMError, match="exact table .*refit it"):
        predictive_from_file(path, edge, 2)
    with pytest.raises(SplitLLMError, match="other input embeddings"):   # today's file on the float table
        PredictiveWire(pc, exact)


def test_fit_slices_never_reach_the_evaluation_text():
    assert fit_slices(10_000, 1000, 3, reserved=4000) == [(7000, 8000), (8000, 9000), (9000, 10_000)]
    with pytest.raises(SplitLLMError, match="overlapping"):
        fit_slices(10_000, 1000, 7, reserved=4000)


def test_a_users_fit_text_fits_its_own_codec(llama, tmp_path, monkeypatch):
    """--fit-text: the codec is fitted on the user's file instead of WikiText-2, cached under its
    content (another text: another codec), and says which text; unreadable, empty or too short
    texts get one-line errors, and a fit text with a codec file is refused."""
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data")
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    mine = tmp_path / "mine.txt"
    mine.write_text("a mill by the river, and farmers in the valley. " * 120)
    said = []
    wiki = build_wire(SplitSpec(split_layer=2, wire="predictive"), lm, data)
    own = build_wire(SplitSpec(split_layer=2, wire="predictive", predictive_fit_text=str(mine)), lm, data,
                     progress=said.append)
    assert own.pc.crc != wiki.pc.crc and own.pc.info["text"] == str(mine) and own.path != wiki.path
    assert any(str(mine) in m for m in said)
    again = build_wire(SplitSpec(split_layer=2, wire="predictive", predictive_fit_text=str(mine)), lm, None)
    assert again.pc.crc == own.pc.crc                          # from the cache, keyed by the text's content
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    for name, msg in (("short.txt", "give a longer text"), ("empty.txt", "is empty"), ("binary.txt", "cannot read"),
                      ("missing.txt", "cannot read")):
        with pytest.raises(SplitLLMError, match=msg):
            build_wire(SplitSpec(split_layer=2, wire="predictive", predictive_fit_text=str(tmp_path / name)), lm, data)
    with pytest.raises(SplitLLMError, match="no codec file"):
        SplitSpec(split_layer=2, wire="predictive", predictive_fit_text=str(mine), predictive_file=str(mine))
    with pytest.raises(SplitLLMError, match="predictive wire"):
        SplitSpec(split_layer=2, wire="tabq", predictive_fit_text=str(mine))


def test_rows_read_any_scale_dtype_as_the_dequantizer_does_and_refuse_other_layouts():
    from splitcli.deploy.predictive import _Rows
    from splitcli.quant.rtn import dequantize_groupwise

    emb = torch.nn.Embedding(40, 16)
    q = QuantEmbedding.from_embedding(emb, bits=8)
    ids = torch.tensor([3, 0, 39, 3])
    assert torch.equal(_Rows(q)[ids], dequantize_groupwise(q.codes, q.scales, q.zeros, 8)[ids])   # bf16: bits
    q.scales, q.zeros = q.scales.float(), q.zeros.half()          # a module cast after it was made
    assert torch.equal(_Rows(q)[ids], dequantize_groupwise(q.codes, q.scales, q.zeros, 8)[ids])
    q.scales = q.scales.reshape(40, 1).repeat(1, 2)               # two groups per row: not this table
    with pytest.raises(SplitLLMError, match="one group per row"):
        _Rows(q)


def test_cloud_fisher_is_the_gauss_newton_matrix_of_the_clouds_loss(llama):
    """Sampled labels estimate E_t Σ_s J_stᵀ (diag p_s - p_s p_sᵀ) J_st (J_st = d logits_s / d h_t):
    checked against that matrix computed exactly from the Jacobians on a short window."""
    from splitcli.deploy.predictive import cloud_fisher
    from splitcli.model.split import CloudHalf, decoder_parts

    lm = SimpleNamespace(model=llama)
    g = torch.Generator().manual_seed(0)
    H = llama.config.hidden_size
    h = torch.randn(5, H, generator=g)
    cloud = CloudHalf(decoder_parts(llama), 2)

    def logits(x):   # [5, H] -> [4, V]: positions 0..3 predict the next token
        out = cloud.layers(x[None], torch.arange(5)[None], None, cloud.new_cache())
        return cloud.parts.lm_head(cloud.parts.norm(out))[0, :-1]

    with torch.enable_grad():
        J = torch.autograd.functional.jacobian(logits, h).double()          # [4, V, 5, H]
        p = logits(h).detach().double().softmax(-1)                            # [4, V]
    want = torch.zeros(H, H, dtype=torch.float64)
    for s in range(4):
        C = torch.diag(p[s]) - p[s, :, None] * p[s][None]                      # [V, V]
        for t in range(1, 5):                                                  # rows 1..: the sink row is raw
            want += J[s, :, t].T @ C @ J[s, :, t]
    want /= 4
    got = cloud_fisher(lm, 2, [(None, h)], samples=4000, seed=1)
    assert torch.allclose(got, got.T) and float(torch.linalg.eigvalsh(got).min()) > -1e-9
    assert float((got - want).norm() / want.norm()) < 0.1                     # Monte Carlo: ~6% at 4000 samples
    again = cloud_fisher(lm, 2, [(None, h)], samples=3, seed=1)
    assert torch.equal(again, cloud_fisher(lm, 2, [(None, h)], samples=3, seed=1))   # seeded: the same fit
    with torch.inference_mode():                                    # as under eval and the servers
        assert torch.equal(again, cloud_fisher(lm, 2, [(None, h.clone())], samples=3, seed=1))
    with pytest.raises(SplitLLMError, match="at least 2 tokens"):
        cloud_fisher(lm, 2, [(None, h[:1])])
