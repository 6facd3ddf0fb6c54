"""Fitting the token-predictive codec (frame format 4) for one deployment (model, split layer), cached.

Fit text: the last `PREDICTIVE_FIT_WINDOWS` windows of `min(2048, context)` tokens of WikiText-2's
wiki.test.raw, or of a user's text file (`fit_text`: text like the deployment's codes smaller);
each window starts at position 0 of its own sequence, as a prompt does, so the attention sink is
represented. Perplexity benchmarks score the *first* windows of the same file, so the two never
overlap (checked). The fitted codec (7.2 MB at hidden 576: predictor, shaping, KLT,
symbol models) is stored as .npz under `cache_root()/codec/`, keyed by everything it depends on,
so `generate` fits once (about 3 minutes for SmolLM2-135M at ℓ = 15 on 2 cores, 1-2 of them the Fisher).
The predictor reads the input embeddings as the 8-bit rows an edge shard stores (`TABLES`), so an
edge needs no float copy of them. The codec is shaped by the cloud half's Fisher (`cloud_fisher`,
on the last `FISHER_WINDOWS` fit windows), which both ends then hold in the codec file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from splitcli.codec.predictive import FILE_VERSION, FRAME_VERSION, PredictiveCodec
from splitcli.codec.predictive_fit import DEFAULT_TARGET_REL_ERROR, SHAPE_FLOOR, SHAPE_GAMMA, fit_predictive
from splitcli.data import WIKITEXT2_TEST
from splitcli.deploy.calibrate import cache_dir, edge_hidden, text_source
from splitcli.errors import SplitLLMError
from splitcli.plan.schema import PREDICTIVE_TABLE, PREDICTIVE_TABLE_BITS
from splitcli.quant import QuantEmbedding

PREDICTIVE_FIT_WINDOWS = 24
FIT_SEQLEN = 2048
#: The cloud's Fisher for the codec's shaping: labels sampled from the model (FISHER_SAMPLES per
#: position, a fixed seed) on the last FISHER_WINDOWS fit windows (~15 s a window for SmolLM2-135M).
FISHER_WINDOWS, FISHER_SAMPLES, FISHER_SEED = 8, 2, 0


#: The tables the predictive codec can predict from, recorded in its info as "table": "rows8", the
#: input embeddings with 8-bit rows exactly as `splitllm quantize --embed-bits 8` stores them (the
#: default where the embedding can be quantized: an edge holding those rows needs no float copy),
#: and "exact", the table as loaded (codec files fitted before the choice existed, and embeddings
#: that cannot be quantized, e.g. Gemma's scaled one).
TABLES = (PREDICTIVE_TABLE, "exact")


class _Rows:
    """An 8-bit embedding of one group per row read as the codec's table, a few rows at a time: no
    float copy and nothing beyond the module's own codes, scales and zeros (what a profile counts
    for an 8-bit embedding). The rows are `QuantEmbedding`'s to the bit: `dequantize_groupwise`'s
    arithmetic (w = q s + (zero - 128 s), each product and sum rounded to float32 on its own), in
    numpy over the module's tensors (views, no copies): a decode step's two rows in a few numpy
    operations, where torch's dispatch of each of its ~8 costs 5-10 us once the codec's weights
    have evicted it from the cache (tests/test_quant_portable.py checks the floats against
    `dequantize_groupwise` under every CPU capability)."""

    def __init__(self, module: QuantEmbedding):
        V, H = self.shape = (module.num_embeddings, module.embedding_dim)
        if tuple(module.codes.shape) != (V, H) or any(tuple(t.shape) != (V, 1) for t in (module.scales, module.zeros)):
            raise SplitLLMError("the predictive codec reads 8-bit embeddings of one group per row: codes [V, H], "
                                f"scales and zeros [V, 1]; this one has {tuple(module.codes.shape)}, "
                                f"{tuple(module.scales.shape)} and {tuple(module.zeros.shape)}")
        self.codes = module.codes.numpy()                                     # [V, H] uint8
        self.scales, self.zeros = (_float32_reader(t.reshape(-1)) for t in (module.scales, module.zeros))

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:   # ids [n] int64 -> [n, H] float32
        ids = np.asarray(ids)
        s, z = (read(ids)[:, None] for read in (self.scales, self.zeros))    # [n, 1]
        offset = z - np.float32(1 << (PREDICTIVE_TABLE_BITS - 1)) * s           # 128 s is exact: one rounding
        return torch.from_numpy(self.codes[ids].astype(np.float32) * s + offset)


def _float32_reader(t: torch.Tensor) -> Callable[[np.ndarray], np.ndarray]:
    """ids [n] -> t[ids] as float32 [n], exactly: bf16 (what `quantize` stores) read as bit patterns,
    widened by a 16-bit shift (no copy of the table); any other dtype widened once, up front."""
    if t.dtype == torch.bfloat16:
        bits = t.view(torch.int16).numpy()
        return lambda ids: (bits[ids].astype(np.uint16).astype(np.uint32) << 16).view(np.float32)
    full = t.to(torch.float32).numpy()
    return lambda ids: full[ids]


def default_table(lm) -> str:
    """The table a new fit for `lm` uses: "rows8" unless its embedding cannot be quantized."""
    module = lm.model.get_input_embeddings()
    return PREDICTIVE_TABLE if isinstance(module, QuantEmbedding) or type(module) is nn.Embedding else "exact"


def codec_embeddings(lm, table: str):
    """The codec's table (`TABLES`) as `lm` holds it: rows of its own 8-bit embedding, the same rows
    made from a float one (exactly as `quantize` makes them, so an edge and a cloud agree to the bit;
    the codec's crc checks it), or the float table itself for "exact"."""
    if table not in TABLES:
        raise SplitLLMError(f"predictive codec table must be one of {', '.join(TABLES)}, got {table!r}")
    module = lm.model.get_input_embeddings()
    if isinstance(module, QuantEmbedding):
        held = f"this edge holds its input embeddings at {module.bits} bits (group {module.group_size})"
        if table == "exact":
            raise SplitLLMError(f"{held} and this predictive codec file predicts from the exact table (fitted before "
                                "8-bit rows): refit it, or write the shards with `splitllm quantize --embed-bits 16` "
                                "(or use --codec tabq)")
        if module.bits != PREDICTIVE_TABLE_BITS or module.group_size != module.embedding_dim:
            raise SplitLLMError(f"{held} and the predictive codec predicts from 8-bit rows of one group per row: "
                                "write the shards with `splitllm quantize`'s default --embed-bits 8 "
                                "(or use --codec tabq)")
        return _Rows(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise SplitLLMError(f"the predictive codec cannot read this model's input embeddings ({type(module).__name__})")
    if table == "exact":
        return weight.detach().float()
    if type(module) is not nn.Embedding:
        raise SplitLLMError(f"this predictive codec predicts from 8-bit rows of the input embeddings, and this model's "
                            f"embedding ({type(module).__name__}) is not a plain table that can be quantized")
    return _Rows(QuantEmbedding.from_embedding(module, bits=PREDICTIVE_TABLE_BITS))


def dense_table(emb) -> torch.Tensor:
    """[V, H] float32 of a codec table (the fit reads every row)."""
    return emb if isinstance(emb, torch.Tensor) else emb[torch.arange(emb.shape[0])]


def fit_slices(n_ids: int, seqlen: int, windows: int, reserved: int = 0) -> list[tuple[int, int]]:
    """[start, end) of the fit windows: the last `windows` windows of `seqlen` of `n_ids` tokens,
    none reaching into the first `reserved` (the evaluation's)."""
    start = n_ids - windows * seqlen
    if windows < 1 or seqlen < 2 or start < reserved:
        raise SplitLLMError(f"the predictive codec's {windows} fit windows of {seqlen} tokens do not fit in "
                            f"{n_ids} tokens of text without overlapping the first {reserved}")
    return [(start + k * seqlen, start + (k + 1) * seqlen) for k in range(windows)]


def fit_windows_for(n_ids: int, seqlen: int) -> int:
    """How many fit windows a text of `n_ids` tokens gives: PREDICTIVE_FIT_WINDOWS, or half of a tiny text."""
    return min(PREDICTIVE_FIT_WINDOWS, max(1, n_ids // (2 * seqlen)))


def fit_seqlen_for(lm) -> int:
    """The fit windows' length for `lm`: FIT_SEQLEN, or its context when shorter."""
    context = getattr(lm.model.config, "max_position_embeddings", None) or FIT_SEQLEN
    return min(FIT_SEQLEN, int(context))


def cloud_fisher(lm, split_layer: int, windows, samples: int = FISHER_SAMPLES,
                 seed: int = FISHER_SEED) -> torch.Tensor | None:
    """The Fisher of the cloud half's next-token distribution w.r.t. the hidden state at ℓ, [H, H]
    float64: E[g gᵀ] over rows 1.. of `windows` ((ids [T], hidden [T, H]) each), g = d(the window's
    NLL)/dh at labels sampled from the model itself (the Gauss-Newton matrix of the loss; at the
    text's own labels, the empirical Fisher, it shapes the codec no better than no shaping).
    None where `lm` holds no cloud half (an edge shard, whose later layers are empty skeletons)."""
    from splitcli.model.split import CloudHalf, decoder_parts

    cloud = CloudHalf(decoder_parts(lm.model), split_layer)
    held = [*cloud.parts.layers[split_layer:], cloud.parts.norm, cloud.parts.lm_head]
    if any(t.is_meta for m in held for t in m.parameters()):
        return None
    H, n = lm.model.config.hidden_size, 0
    gen = torch.Generator().manual_seed(seed)
    # the callers' inference mode (eval, serving) would leave the graph empty; enable_grad alone does not lift it
    with torch.inference_mode(False), torch.enable_grad():
        F = torch.zeros(H, H, dtype=torch.float64)
        for _ids, h in windows:
            if len(h) < 2:
                continue
            hh = h.detach().to(torch.float32).clone().requires_grad_(True)        # [T, H]
            logits = cloud.forward(hh[None], torch.arange(len(hh))[None], None, cloud.new_cache())
            logits = logits[0, :-1].float()                                          # [T - 1, V]
            probs = logits.detach().softmax(-1)
            for k in range(samples):
                y = torch.multinomial(probs, 1, generator=gen)[:, 0]
                loss = nn.functional.cross_entropy(logits, y, reduction="sum")
                g = torch.autograd.grad(loss, hh, retain_graph=k + 1 < samples)[0][1:].double()
                F += g.T @ g / samples
            n += len(hh) - 1
    if n == 0:
        raise SplitLLMError("the cloud's Fisher needs windows of at least 2 tokens")
    return F / n


def fit_from_ids(lm, split_layer: int, ids: list[int], *, windows: int, seqlen: int, reserved: int = 0,
                 target_rel_error: float = DEFAULT_TARGET_REL_ERROR, step: float | None = None,
                 tick: Callable[[int], None] | None = None,
                 text_name: str = WIKITEXT2_TEST) -> tuple[PredictiveCodec, torch.Tensor | _Rows]:
    """(codec, its table of input embeddings: `codec_embeddings`) fitted on the edge's hidden states
    of the fit windows of `ids` (the tokens of the text `text_name`, recorded in the codec's info)."""
    table = default_table(lm)
    emb = codec_embeddings(lm, table)   # first: an edge it cannot read fails before the forwards
    wins = []
    for k, (a, b) in enumerate(fit_slices(len(ids), seqlen, windows, reserved)):
        w = torch.tensor(ids[a:b])
        wins.append((w, edge_hidden(lm.model, split_layer, w)))
        if tick is not None:
            tick(k + 1)
    shaping = wins[-FISHER_WINDOWS:]
    fisher = cloud_fisher(lm, split_layer, shaping)   # None on an edge shard: an unshaped codec
    info = dict(text=text_name, fit_tokens=[len(ids) - windows * seqlen, len(ids)],
                windows=windows, seqlen=seqlen, split_layer=split_layer, table=table,
                target_rel_error=None if step is not None else target_rel_error,
                shaping=None if fisher is None else dict(fisher_windows=len(shaping), samples=FISHER_SAMPLES,
                                                         seed=FISHER_SEED, gamma=SHAPE_GAMMA, floor=SHAPE_FLOOR))
    return fit_predictive(dense_table(emb), wins, step=step, target_rel_error=target_rel_error, fisher=fisher,
                          info=info), emb


def predictive_from_file(path, lm, split_layer: int) -> tuple[PredictiveCodec, torch.Tensor | _Rows, dict]:
    """(codec, input embeddings, info) from a codec file (.npz, e.g. the cloud's cache file) for
    (lm, ℓ): refused with a clear error when it was fitted at another layer (the wire checks the
    embeddings)."""
    pc = PredictiveCodec.load(path)
    fitted_at = pc.info.get("split_layer")
    if fitted_at is not None and fitted_at != split_layer:
        raise SplitLLMError(f"predictive codec file {path} was fitted at split layer {fitted_at}, not {split_layer}")
    emb = codec_embeddings(lm, pc.info.get("table", "exact"))   # files without one predate 8-bit rows
    return pc, emb, dict(path=str(path), cache="file")


def fitted_predictive(lm, split_layer: int, data_dir=None, progress: Callable[[str], None] | None = None,
                      target_rel_error: float = DEFAULT_TARGET_REL_ERROR,
                      fit_text=None) -> tuple[PredictiveCodec, torch.Tensor | _Rows, dict]:
    """(codec, its table of input embeddings, info) for (lm's weights, ℓ), from the cache or fitted
    now, on the last windows of WikiText-2's wiki.test.raw or of the `fit_text` file (keyed by its
    content).
    A corrupt or mismatched cache file is refitted and replaced, never trusted."""
    text, text_sha, source = text_source(fit_text, data_dir, "fit text")
    seqlen = fit_seqlen_for(lm)
    table = default_table(lm)
    key = hashlib.sha256(json.dumps(dict(kind="predictive", file=FILE_VERSION, frame=FRAME_VERSION, model=lm.sha256,
                                         split_layer=split_layer, text=text_sha, windows=PREDICTIVE_FIT_WINDOWS,
                                         seqlen=seqlen, target=target_rel_error, error="bulk, mean per token",
                                         table=table, shaping=[FISHER_WINDOWS, FISHER_SAMPLES, FISHER_SEED,
                                                               SHAPE_GAMMA, SHAPE_FLOOR]),
                                    sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir() / f"{key}.npz"
    info = dict(path=str(path), fit_windows=PREDICTIVE_FIT_WINDOWS, fit_seqlen=seqlen,
                fit_slice=f"last {PREDICTIVE_FIT_WINDOWS} x {seqlen} tokens of {source}")
    if path.is_file():
        try:
            pc = PredictiveCodec.load(path)
        except SplitLLMError:
            pass   # fall through: refit and replace the bad file
        else:
            return pc, codec_embeddings(lm, table), dict(info, cache="hit")
    ids = [int(i) for i in lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
    if len(ids) < seqlen:
        raise SplitLLMError(f"the fit text {source} has {len(ids)} tokens; the predictive codec fits on windows of "
                            f"{seqlen}: give a longer text")
    windows = fit_windows_for(len(ids), seqlen)
    if progress is not None:
        progress(f"fitting the predictive codec at layer {split_layer} on the last {windows} x {seqlen} tokens "
                 f"of {source} (cached afterwards)")
    quarters = {-(-k * windows // 4) for k in range(1, 5)}

    def tick(done: int) -> None:   # the edge's forward over the fit text is most of the time
        if progress is not None and done in quarters:
            progress(f"  fit text through the edge: {done}/{windows} windows")

    pc, emb = fit_from_ids(lm, split_layer, ids, windows=windows, seqlen=seqlen, target_rel_error=target_rel_error,
                           tick=tick, text_name=source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pc.save(tmp)
    tmp.replace(path)
    if progress is not None:
        progress(f"predictive codec: step {pc.step:.4g}, relative error {pc.info['rel_error_fit']:.4f} on the fit text "
                 f"(non-massive channels; {pc.info['massive_channels']} massive)")
    return pc, emb, dict(info, cache="miss", fit_windows=windows)
