"""Token generation over any Session: sampling, stopping, and the prompt's tokenization."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SplitLLMError
from .session import Session, StepStats


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_p in (0, 1] trims the sampled distribution."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise SplitLLMError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise SplitLLMError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SplitLLMError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, n] generated ids (rows that stopped early are padded with eos)
    prefill: StepStats
    steps: list[StepStats] = field(default_factory=list)  # one per decode step
    stopped_on_eos: bool = False


def generate(
    session: Session,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cfg: SamplingConfig,
    eos_token_ids: set[int] | None = None,
    prefill_chunk: int | None = None,
) -> GenerationResult:
    """Prefill the prompt [B, T], then decode up to cfg.max_new_tokens tokens one at a time."""
    eos = set(eos_token_ids or ())
    pad_id = min(eos) if eos else 0
    gen = torch.Generator().manual_seed(cfg.seed)
    logits = session.prefill(input_ids, attention_mask, chunk_size=prefill_chunk)[:, -1]
    n_prefill = len(session.stats)
    prefill = _sum_stats(session.stats[:n_prefill])
    b = input_ids.shape[0]
    done = torch.zeros(b, dtype=torch.bool)
    out: list[torch.Tensor] = []
    for i in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg, gen)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        done |= torch.tensor([int(t) in eos for t in nxt], dtype=torch.bool)
        if bool(done.all()) or i == cfg.max_new_tokens - 1:
            break
        logits = session.forward(nxt[:, None])[:, -1]
    tokens = torch.stack(out, dim=1)
    return GenerationResult(tokens, prefill, session.stats[n_prefill:], bool(done.all()))


def _sum_stats(stats: list[StepStats]) -> StepStats:
    total = StepStats(tokens=0)
    for s in stats:
        for name in vars(total):
            setattr(total, name, getattr(total, name) + getattr(s, name))
    return total


def encode_prompts(tokenizer, prompts: list[str], chat: bool = False, context_length: int | None = None):
    """Tokenize prompts into a left-padded batch: (input_ids [B, T], attention_mask [B, T])."""
    if not prompts or any(not p or not p.strip() for p in prompts):
        raise SplitLLMError("the prompt is empty: give some text with --prompt")
    rows = []
    for p in prompts:
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise SplitLLMError("--chat needs a tokenizer with a chat template; this model has none")
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        rows.append(list(ids))
    longest = max(len(r) for r in rows)
    if context_length is not None and longest >= context_length:
        raise SplitLLMError(
            f"the prompt is {longest} tokens long; this model's context is {context_length} tokens"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, longest - len(r) :] = 1
    return ids, mask
