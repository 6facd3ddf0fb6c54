"""A tiny real Hugging Face tokenizer and a tiny random Llama, for tests and demos (no hub access).

The tokenizer is a byte-level BPE trained in memory on a few sentences, so it merges across word
boundaries the way real tokenizers do (which the scorer's encode_pair must handle).
"""

from __future__ import annotations

import torch

from splitcli.eval.protocols import hf_logits_fn

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France?\nAnswer: Paris",
    "Passage: the sun is a star. Question: is the sun a star? Answer: yes no",
    "Sarah was a much better surgeon than Maria so Maria always got the harder cases.",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
] * 20


def toy_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # default init gives near-uniform logits; sharpen so choices differ
        model.lm_head.weight.mul_(20.0)
    return model


def logits_fn_for(model):
    """The LogitsFn of a Hugging Face causal LM (kept for test readability)."""
    return hf_logits_fn(model)
