"""README's Serving example, run verbatim: the curl block (bash) and the openai-client block
(python) are cut out of README.md and run as they are, against a `serve-cloud` and a `serve-edge`
this test starts from a config that includes configs/serve.yaml (tiny model, ports picked at run
time; `$SPLITLLM_EDGE` and `$SPLITLLM_API_KEY` carry the address and the key). Both must print
exactly the greedy text `splitllm generate` prints in process, streaming and not."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from test_serve_cli import KEY, SPLITLLM, launch, nothing_left_running  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "serve.yaml"


def serving_blocks() -> dict[str, list[str]]:
    """The fenced blocks of README's Serving section, by language."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Serving", 1)[1].split("\n## ", 1)[0]
    blocks: dict[str, list[str]] = {}
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S):
        blocks.setdefault(lang, []).append(body)
    return blocks


def _request(block: str) -> dict:
    """The model and prompt the README's example asks for (one request: both blocks agree)."""
    model = re.search(r'"?model"?\s*[:=]\s*"([^"]+)"', block).group(1)
    prompt = re.search(r'"?prompt"?\s*[:=]\s*"([^"]+)"', block).group(1)
    max_tokens = int(re.search(r'"?max_tokens"?\s*[:=]\s*(\d+)', block).group(1))
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens}


def test_readme_serving_example_runs_verbatim(tiny_model_dir, tmp_path):
    blocks = serving_blocks()
    curl = [b for b in blocks["bash"] if b.lstrip().startswith("curl") and "/v1/completions" in b]
    assert len(curl) == 1 and len(blocks["python"]) == 1, "README's Serving section lost its curl or python block"
    curl, client = curl[0], blocks["python"][0]
    asked = _request(curl)
    assert asked == _request(client)
    # The three commands of the first block name the example config and the variables the blocks use.
    commands = blocks["bash"][0]
    assert "serve-cloud --config configs/serve.yaml" in commands and "serve-edge  --config configs/serve.yaml" in commands
    assert "SPLITLLM_EDGE=" in commands and "SPLITLLM_API_KEY=" in commands

    # The tiny model's plan (base.yaml's, resized), and a serve config of the example around it.
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "include": str(EXAMPLE.with_name("base.yaml")), "model_id": str(tiny_model_dir), "n_layers": 4,
        "split_layer": 2, "l_w": 2, "codec": {"tau": 3.0, "tau_quantile": None, "entropy": False, "q_bar": 6},
        "budgets": {"deadline_s": None}}))
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"include": [str(EXAMPLE), str(plan)], "serve": {
        "cloud": {"metrics_port": None}, "edge": {"model_name": asked["model"], "deadline": "10s"}}}))
    env = {**os.environ, "SPLITLLM_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    n = str(asked["max_tokens"])
    reference = subprocess.run([SPLITLLM, "generate", "--config", str(plan), "-m", str(tiny_model_dir), "-p",
                                asked["prompt"], "-n", n, "--no-steps"], capture_output=True, text=True, env=env,
                               timeout=300)
    assert reference.returncode == 0, reference.stderr
    text = reference.stdout[:-1]  # generate prints the text and one newline
    assert text.strip(), "the reference text is empty: the comparison would prove nothing"
    with launch(["serve-cloud", "--config", str(config), "-m", str(tiny_model_dir), "--port", "0"],
                r" on (127\.0\.0\.1:\d+) ", tmp_path) as (_, cloud):
        with launch(["serve-edge", "--config", str(config), "-m", str(tiny_model_dir), "--port", "0",
                     "--cloud", cloud.group(1)], r" on (http://\S+)/v1$", tmp_path) as (_, edge):
            env["SPLITLLM_EDGE"] = edge.group(1)
            out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, env=env, timeout=300)
            assert out.returncode == 0, out.stderr
            answer = json.loads(out.stdout)
            assert answer["choices"][0]["text"] == text and answer["model"] == asked["model"]
            out = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, env=env, timeout=300)
            assert out.returncode == 0, out.stderr
            assert out.stdout == f"{text}\n{text}\n"  # non-streaming, then streaming: the same greedy text
            # No token, no service: the same request without the key is refused with 401.
            env.pop("SPLITLLM_API_KEY")
            out = subprocess.run(["bash", "-c", curl.replace("curl -s", "curl -s -o /dev/null -w '%{http_code}'")],
                                 capture_output=True, text=True, env=env, timeout=60)
            assert out.stdout == "401"
