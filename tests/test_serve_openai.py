"""The edge's OpenAI-compatible API: response shapes, auth, bad input, metrics (FastAPI TestClient),
then end to end with the real `openai` client against uvicorn on 127.0.0.1 (a port chosen at run
time), and once with the cloud half on a real gRPC server. Greedy text must equal in-process
`runtime.generate.generate` on the same split."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from splitcli.deploy import SplitSpec, build_split
from splitcli.errors import SplitLLMError
from splitcli.runtime.generate import SamplingConfig, encode_prompts, generate
from splitcli.serve.backends import LocalBackend
from splitcli.serve.openai_api import create_app

KEY, NAME = "edge-key", "tiny-split"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from splitcli.model.loader import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def split(lm):
    return build_split(lm, SplitSpec(split_layer=2))


@pytest.fixture(scope="module")
def client(split, lm):
    app = create_app(LocalBackend(split), model_name=NAME, api_key=KEY, tokenizer=lm.tokenizer)
    with TestClient(app) as c:
        yield c


def eos_of(lm):
    return {t for t in (lm.tokenizer.eos_token_id, lm.model.config.eos_token_id) if isinstance(t, int)}


def reference(split, lm, prompt, n, chat=False, **sampling):
    """(text, token count) of in-process generation, decoded as `splitllm generate` prints it."""
    ids, mask = encode_prompts(lm.tokenizer, [prompt], chat=chat)
    out = generate(split.session(), ids, mask, SamplingConfig(max_new_tokens=n, **sampling), eos_of(lm))
    return lm.tokenizer.decode(out.tokens[0], skip_special_tokens=True), out.tokens.shape[1]


def sse(response) -> list:
    """The data of each server-sent event; the last must be [DONE]."""
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert all(not e.startswith("data") for e in events)
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


# -- shapes -------------------------------------------------------------------------------

def test_health_models_and_auth(client):
    assert client.get("/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.post("/v1/completions", json={"model": NAME, "prompt": PROMPT})
    assert r.status_code == 401  # refused before the body is read
    models = client.get("/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert client.get(f"/v1/models/{NAME}", headers=AUTH).json()["id"] == NAME
    assert client.get("/v1/models/other", headers=AUTH).status_code == 404
    assert client.get("/v1/nothing", headers=AUTH).json()["error"]["code"] == "not_found"
    assert client.get("/v1/nothing").status_code == 401  # no probing the namespace without a key
    assert client.get("/nothing").status_code == 404 and client.get("/nothing").json()["error"]["message"]


def test_completion_non_streaming_and_streaming_equal_in_process(client, split, lm):
    want, n = reference(split, lm, PROMPT, 8)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    r = client.post("/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == NAME
    assert out["choices"][0]["text"] == want and out["choices"][0]["finish_reason"] == "length"
    prompt_len = len(lm.tokenizer(PROMPT)["input_ids"])
    assert out["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}

    r = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}},
                    headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == n
    assert len({c["id"] for c in chunks}) == 1


def test_token_id_prompt_and_seeded_sampling(client, split, lm):
    ids = lm.tokenizer(PROMPT)["input_ids"]
    want, _ = reference(split, lm, PROMPT, 6, temperature=0.9, top_p=0.8, seed=11)
    body = {"model": NAME, "prompt": ids, "max_tokens": 6, "temperature": 0.9, "top_p": 0.8, "seed": 11}
    assert client.post("/v1/completions", json=body, headers=AUTH).json()["choices"][0]["text"] == want


def test_chat_non_streaming_and_streaming(client, split, lm):
    question = "What is the capital of France?"
    want, n = reference(split, lm, question, 7, chat=True)
    body = {"model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 7,
            "temperature": 0}
    out = client.post("/v1/chat/completions", json=body, headers=AUTH).json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert out["usage"]["completion_tokens"] == n
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}, headers=AUTH))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    parts = {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": question}]}]}
    assert client.post("/v1/chat/completions", json=parts, headers=AUTH).json()["choices"][0]["message"][
        "content"] == want


def test_stop_string_cuts_the_text(client, split, lm):
    full, _ = reference(split, lm, PROMPT, 12)
    stop = full.strip()[2:5]  # a piece of the greedy output past its first characters
    assert len(stop) == 3 and stop in full
    want = full[: full.find(stop)]
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop": [stop, "zzzz"]}
    out = client.post("/v1/completions", json=body, headers=AUTH).json()["choices"][0]
    assert out == {**out, "text": want, "finish_reason": "stop"}
    chunks = sse(client.post("/v1/completions", json={**body, "stream": True}, headers=AUTH))
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# -- refusals -----------------------------------------------------------------------------

def _body(**over):
    return {"model": NAME, "prompt": PROMPT, "max_tokens": 4, **over}


BAD = [
    ("malformed json", b"{\"model\": ", 400),
    ("not an object", b"[1, 2]", 400),
    ("not utf-8", b"\xff\xfe{}", 400),
    ("nested 100k deep", b"[" * 100_000 + b"]" * 100_000, 400),
    ("unknown model", _body(model="gpt-4"), 404),
    ("no prompt", {"model": NAME}, 400),
    ("empty prompt", _body(prompt="   "), 400),
    ("empty token list", _body(prompt=[]), 400),
    ("token id out of vocab", _body(prompt=[1, 10**9]), 400),
    ("two prompts", _body(prompt=["a", "b"]), 400),
    ("max_tokens 0", _body(max_tokens=0), 400),
    ("max_tokens over context", _body(max_tokens=100_000), 400),
    ("max_tokens a string", _body(max_tokens="8"), 400),
    ("n 2", _body(n=2), 400),
    ("temperature 3", _body(temperature=3), 400),
    ("top_p 0", _body(top_p=0), 400),
    ("negative seed", _body(seed=-1), 400),
    ("logprobs", _body(logprobs=2), 400),
    ("five stops", _body(stop=["a", "b", "c", "d", "e"]), 400),
    ("empty stop", _body(stop=[""]), 400),
    ("body too large", _body(prompt="x" * (2 << 20)), 413),
]


@pytest.mark.parametrize("body,status", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_completion_requests_get_openai_errors(client, body, status):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post("/v1/completions", headers=AUTH, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"] and "Traceback" not in r.text


def test_chunked_body_over_the_limit_is_cut_off(split, lm):
    app = create_app(LocalBackend(split), model_name=NAME, api_key=None, tokenizer=lm.tokenizer,
                     max_body_bytes=4096)

    def body():  # no content-length: the server must count as it reads
        for _ in range(1000):
            yield b" " * 1024

    with TestClient(app) as c:
        r = c.post("/v1/completions", content=body())
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]


BAD_CHAT = [
    ("no messages", {"messages": []}),
    ("empty content", {"messages": [{"role": "user", "content": " "}]}),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}),
    ("tools", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
]


@pytest.mark.parametrize("body", [b[1] for b in BAD_CHAT], ids=[b[0] for b in BAD_CHAT])
def test_bad_chat_requests_get_400(client, body):
    r = client.post("/v1/chat/completions", json={"model": NAME, **body}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["message"], r.text


def test_busy_server_answers_429(split, lm):
    app = create_app(LocalBackend(split), model_name=NAME, api_key=None, tokenizer=lm.tokenizer, max_running=1)
    with TestClient(app) as c:
        assert app.state.api.slots.acquire()  # one generation "running"
        r = c.post("/v1/completions", json=_body())
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        app.state.api.slots.release()
        assert c.post("/v1/completions", json=_body()).status_code == 200  # no key configured: open


class FailingBackend:
    """Two tokens, then the cloud 'goes away'."""

    context_length, vocab_size = 512, 49152

    def generate(self, input_ids, cfg, eos_token_ids=None):
        yield 42
        yield 43
        raise SplitLLMError("the cloud ended the session without answering")


def test_generation_error_ends_the_stream_and_metrics_count_it(lm):
    app = create_app(FailingBackend(), model_name=NAME, api_key=KEY, tokenizer=lm.tokenizer)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json=_body(stream=True, max_tokens=8), headers=AUTH)
        events = sse(r)
        assert events[-1]["error"]["message"] == "the cloud ended the session without answering"
        assert all("choices" in e for e in events[:-1])
        r = c.post("/v1/completions", json=_body(max_tokens=8), headers=AUTH)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert app.state.api.slots.used == 0
        text = c.get("/metrics").text
    assert f'splitllm:requests_running{{model_name="{NAME}"}} 0.0' in text
    assert f'splitllm:request_errors_total{{model_name="{NAME}",status="500"}} 2.0' in text
    assert f'splitllm:generation_tokens_total{{model_name="{NAME}"}} 4.0' in text


def test_metrics_after_requests(split, lm):
    app = create_app(LocalBackend(split), model_name=NAME, api_key=KEY, tokenizer=lm.tokenizer)
    with TestClient(app) as c:
        for stream in (False, True):
            assert c.post("/v1/completions", json=_body(stream=stream, temperature=0), headers=AUTH).status_code == 200
        c.post("/v1/completions", json=_body(model="nope"), headers=AUTH)
        r = c.get("/metrics")  # open, like vLLM's and llama.cpp's
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    prompt_len = len(lm.tokenizer(PROMPT)["input_ids"])
    lines = set(r.text.splitlines())
    label = f'{{model_name="{NAME}"}}'
    assert f"splitllm:prompt_tokens_total{label} {2.0 * prompt_len}" in lines
    assert f"splitllm:generation_tokens_total{label} 8.0" in lines
    assert f"splitllm:time_to_first_token_seconds_count{label} 2.0" in lines
    assert f"splitllm:inter_token_latency_seconds_count{label} 6.0" in lines
    assert f'splitllm:request_success_total{{finished_reason="length",model_name="{NAME}"}} 2.0' in lines
    assert f'splitllm:request_errors_total{{model_name="{NAME}",status="404"}} 1.0' in lines


# -- end to end: the openai client against uvicorn ----------------------------------------

@contextlib.contextmanager
def uvicorn_serving(app):
    """Serve `app` on 127.0.0.1 at a free port in a thread; stop it and wait (bounded) on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def test_openai_client_end_to_end(split, lm):
    import openai

    comp_want, _ = reference(split, lm, PROMPT, 8)
    question = "Name a color."
    chat_want, _ = reference(split, lm, question, 8, chat=True)
    app = create_app(LocalBackend(split), model_name=NAME, api_key=KEY, tokenizer=lm.tokenizer)
    with uvicorn_serving(app) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key=KEY, timeout=30, max_retries=0)
        assert [m.id for m in client.models.list()] == [NAME]
        out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0)
        assert out.choices[0].text == comp_want and out.choices[0].finish_reason == "length"
        stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == comp_want
        messages = [{"role": "user", "content": question}]
        chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
        assert chat.choices[0].message.content == chat_want
        stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == chat_want
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=NAME, prompt=PROMPT, max_tokens=0)


class SlowBackend:
    """A token every 20 ms, up to max_tokens; records when its iterator was closed."""

    context_length, vocab_size = 512, 49152

    def __init__(self):
        self.closed = threading.Event()

    def generate(self, input_ids, cfg, eos_token_ids=None):
        try:
            for _ in range(cfg.max_new_tokens):
                time.sleep(0.02)
                yield 42
        finally:
            self.closed.set()


def test_client_leaving_mid_stream_frees_its_slot(lm):
    import httpx2 as httpx  # what openai and huggingface_hub (via transformers) bring; TestClient uses it too

    backend = SlowBackend()
    app = create_app(backend, model_name=NAME, api_key=KEY, tokenizer=lm.tokenizer)
    with uvicorn_serving(app) as base_url:
        with httpx.stream("POST", f"{base_url}/completions", json=_body(stream=True, max_tokens=400),
                          headers=AUTH, timeout=20) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ") and app.state.api.slots.used == 1
        assert backend.closed.wait(10), "the generation went on after the client left"
        deadline = time.monotonic() + 10
        while app.state.api.slots.used and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.state.api.slots.used == 0
        text = httpx.get(f"{base_url.removesuffix('/v1')}/metrics", timeout=10).text
    assert f'splitllm:requests_running{{model_name="{NAME}"}} 0.0' in text
    assert f'splitllm:request_errors_total{{model_name="{NAME}",status="499"}} 1.0' in text


def test_concurrent_streams_each_equal_in_process(split, lm):
    import openai

    prompts = [PROMPT, "Once upon a time", "def main():"]
    wants = [reference(split, lm, p, 6)[0] for p in prompts]
    app = create_app(LocalBackend(split), model_name=NAME, api_key=KEY, tokenizer=lm.tokenizer)
    outs, errors = [None] * len(prompts), []

    def run(i, base_url):
        try:
            client = openai.OpenAI(base_url=base_url, api_key=KEY, timeout=30, max_retries=0)
            stream = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=6, temperature=0,
                                               stream=True)
            outs[i] = "".join(c.choices[0].text for c in stream)
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    with uvicorn_serving(app) as base_url:
        threads = [threading.Thread(target=run, args=(i, base_url)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors and outs == wants


class BrokenTokenizer:
    eos_token_id, chat_template = 0, None

    def __call__(self, text, add_special_tokens=True):
        raise RuntimeError("tokenizer bug")


def test_unexpected_errors_are_one_line_500s_and_stat_keeping_wires_are_refused(split):
    app = create_app(FailingBackend(), model_name=NAME, api_key=None, tokenizer=BrokenTokenizer())
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json=_body())
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError"
    from types import SimpleNamespace

    with pytest.raises(SplitLLMError, match="keep_stats=False"):
        LocalBackend(SimpleNamespace(wire=SimpleNamespace(keep_stats=True), edge=split.edge))


# -- the cloud half on a real gRPC server -------------------------------------------------

def test_remote_backend_equals_in_process(split, lm):
    from splitcli.serve.backends import RemoteBackend
    from splitcli.serve.client import RemoteCloud
    from splitcli.serve.cloud import CloudServer, CloudSettings

    want, _ = reference(split, lm, PROMPT, 6)
    server = CloudServer(split, CloudSettings(model_sha256=lm.sha256, api_key="cloud-key"))
    backend = None
    try:
        backend = RemoteBackend(split, RemoteCloud(f"127.0.0.1:{server.port}", "cloud-key", lm.sha256,
                                                   timeout_s=60.0))
        app = create_app(backend, model_name=NAME, api_key=KEY, tokenizer=lm.tokenizer)
        with TestClient(app) as c:
            body = _body(max_tokens=6, temperature=0)
            assert c.post("/v1/completions", json=body, headers=AUTH).json()["choices"][0]["text"] == want
            chunks = sse(c.post("/v1/completions", json={**body, "stream": True}, headers=AUTH))
            assert "".join(c["choices"][0]["text"] for c in chunks) == want
            stop = want.strip()[:2]  # cuts generation short: the edge closes its cloud session early
            out = c.post("/v1/completions", json={**body, "stop": stop}, headers=AUTH).json()["choices"][0]
            assert out["text"] == want[: want.find(stop)] and out["finish_reason"] == "stop"
        deadline = time.monotonic() + 10
        while server.servicer.session_count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.servicer.session_count == 0  # every session freed while the server still runs
    finally:
        if backend is not None:
            backend.close()
        server.stop(0)
    assert server.servicer.session_count == 0


class GateTokenizer:
    """Blocks inside tokenization until released: a long prompt's tokenization, made deterministic."""
    eos_token_id, chat_template = 0, None

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, text, add_special_tokens=True):
        self.entered.set()
        assert self.release.wait(30), "the test never released the tokenizer"
        raise RuntimeError("released")


def test_tokenizing_a_prompt_does_not_block_the_event_loop():
    # Review finding: prompts were tokenized inside the async handler, so a few 1 MiB prompts
    # stalled /health (4 ms -> 1.9 s) and served the requests one after another.
    import httpx2 as httpx

    tok = GateTokenizer()
    app = create_app(FailingBackend(), model_name=NAME, api_key=None, tokenizer=tok)
    with uvicorn_serving(app) as base:
        root = base.removesuffix("/v1")
        post = threading.Thread(target=lambda: httpx.post(f"{base}/completions", json=_body(), timeout=40))
        post.start()
        try:
            assert tok.entered.wait(20), "the completion never reached the tokenizer"
            r = httpx.get(f"{root}/health", timeout=5)   # times out while the loop is blocked
            assert r.status_code == 200
        finally:
            tok.release.set()
            post.join(40)
        assert not post.is_alive()
