"""bench quant reports where it is while it works: each perplexity window and each finished run."""

import torch

from splitcli.bench.quant import table4_ppl
from tests.test_bench_quant import _tiny


def test_table4_reports_every_window_and_every_result():
    model = _tiny()
    ids = torch.randint(0, 96, (200,), generator=torch.Generator().manual_seed(0))
    seen = []
    table4_ppl(model, ids, [0, 2], seqlen=32, windows=2, group_size=32, bits=4,
               progress=lambda done, total, what: seen.append((done, total, what)))
    whats = [w for _, _, w in seen]
    assert whats[:2] == ["ppl fp32: window 1/2", "ppl fp32: window 2/2"]
    assert "ppl front ℓw=2: window 2/2" in whats and "ppl back ℓw=2: window 1/2" in whats
    finished = [w for w in whats if "window" not in w]
    # one line per finished run, in order, each with its perplexity: fp (labelled ℓw=0), front 2, back 2
    assert [w.rsplit(": ", 1)[0] for w in finished] == ["ppl fp ℓw=0", "ppl front ℓw=2", "ppl back ℓw=2"]
    assert all(float(w.rsplit(": ", 1)[1]) > 1 for w in finished)
    assert [d for d, _, w in seen if w in finished] == [1, 2, 3] and all(t == 3 for _, t, _ in seen)
