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
