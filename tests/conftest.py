"""Shared fixtures: tiny random models of several families, and the real default model (loaded once)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _tiny(family: str):
    """A tiny random-weight causal LM of `family`, fp32, eval mode, deterministic."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "llama":
        cfg = tf.LlamaConfig(**TINY)
    elif family == "mistral":
        cfg = tf.MistralConfig(**TINY, sliding_window=8)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**TINY)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**TINY, head_dim=16)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**TINY, head_dim=16, sliding_window=8, attn_implementation="eager")
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **TINY, head_dim=16, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        )
    else:
        raise ValueError(family)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model(request):
    return _tiny(request.param)


@pytest.fixture(scope="session")
def real_lm():
    """The embedded default model (SmolLM2-135M), converted once into the user cache."""
    from splitcli.model.loader import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face directory with the real tokenizer (vocab 49152)."""
    import transformers as tf

    from splitcli.model.loader import materialize, resolve_model

    real_dir, _ = materialize(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**{**TINY, "vocab_size": 49152, "max_position_embeddings": 512})
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tf.AutoTokenizer.from_pretrained(str(real_dir)).save_pretrained(out)
    return out


def _multiprocessing_helper(proc) -> bool:
    """multiprocessing's resource tracker (or forkserver): one per parent process by design, started
    the first time a test uses a spawn context; it exits when pytest does (EOF on its pipe). Not
    something a test left running."""
    import psutil

    from multiprocessing import resource_tracker

    if proc.pid == getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None):
        return True
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(f"from multiprocessing.{m} import main" in cmd for m in ("resource_tracker", "forkserver"))


def _leftovers(grace_s: float = 10.0) -> tuple[list[str], list[str]]:
    """Child processes of this pytest process and non-daemon threads besides the main one that are
    still running after `grace_s` (children that exited meanwhile are reaped)."""
    import threading
    import time

    import psutil

    deadline = time.monotonic() + grace_s
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        children = []
    children = [p for p in children if not _multiprocessing_helper(p)]
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    procs = []
    for p in alive:
        try:
            procs.append(f"pid {p.pid} ({p.status()}): {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            continue  # gone between the wait and the look
    main = threading.main_thread()
    threads = [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    names = [f"{t.name} (ident {t.ident}, target {getattr(t, '_target', None)!r})"
             for t in threads if t.is_alive()]
    return procs, names


def pytest_sessionfinish(session, exitstatus):
    """Nothing left running after the suite (issue 13): a child process of pytest, or a non-daemon
    thread besides the main one, still alive at the end fails the run (exit status 1) and is named.
    Leftover children are killed afterwards so a failing run does not leave them behind either."""
    import sys

    import psutil

    procs, threads = _leftovers()
    if not procs and not threads:
        return
    lines = ["LEFT RUNNING after the test session (tests must stop what they start):"]
    lines += [f"  child process {p}" for p in procs] + [f"  thread {t}" for t in threads]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        reporter.write_line(line, red=True) if reporter is not None else print(line, file=sys.stderr)
    for p in psutil.Process().children(recursive=True):
        if _multiprocessing_helper(p):
            continue
        try:
            p.kill()
        except psutil.Error:
            pass
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(params=["splitllm", "torch"])
def int4_layout(request, monkeypatch):
    """Each Int4Linear built in the test holds this layout: splitllm's own AVX2 kernel (skipped
    where it is unavailable, e.g. under ATEN_CPU_CAPABILITY=default) or torch's int4 kernel."""
    from splitcli.quant import kernels

    if request.param == "torch":
        monkeypatch.setattr(kernels, "available", lambda: False)
        yield request.param
        return
    if not kernels.available():
        pytest.skip(f"splitllm's int4 kernel is unavailable here: {kernels.why_unavailable()}")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # it is chosen up to kernels.INT4_MAX_THREADS torch threads
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test (splitllm's CPU kernels are chosen by the
    thread count: kernels.use_for_int4 / use_for_int8), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
