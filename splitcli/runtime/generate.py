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

    @property
    def top(self) -> int:
        """Logits a step sampled with this config reads (`Session.forward`'s `top`): the largest
        only when greedy, all of them (0) when it samples."""
        return 1 if self.temperature == 0 else 0


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


class TokenStream:
    """The sampled tokens of one generation: sampling with the config's seed, rows that reached
    an eos token padded with it from then on, and when to stop. Every generation loop (plain,
    adaptive, handoff) samples through one of these."""

    def __init__(self, cfg: SamplingConfig, batch: int, eos_token_ids: set[int] | None = None):
        self.cfg = cfg
        self.eos = set(eos_token_ids or ())
        self.pad_id = min(self.eos) if self.eos else 0
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.done = torch.zeros(batch, dtype=torch.bool)  # [B] rows that produced eos
        self.out: list[torch.Tensor] = []

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] of the last position -> the next tokens [B] (recorded)."""
        nxt = sample_next(logits, self.cfg, self.generator)
        nxt = torch.where(self.done, torch.full_like(nxt, self.pad_id), nxt)
        self.out.append(nxt)
        self.done |= torch.tensor([int(t) in self.eos for t in nxt], dtype=torch.bool)
        return nxt

    @property
    def all_eos(self) -> bool:
        return bool(self.done.all())

    @property
    def finished(self) -> bool:
        """Every row ended on eos, or max_new_tokens were sampled: no further forward is needed."""
        return self.all_eos or len(self.out) >= self.cfg.max_new_tokens

    def tokens(self) -> torch.Tensor:  # [B, n]
        return torch.stack(self.out, dim=1)


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
    stream = TokenStream(cfg, input_ids.shape[0], eos_token_ids)
    session.reserve(input_ids.shape[1] + cfg.max_new_tokens)  # fast-path sessions size their caches once
    logits = session.prefill(input_ids, attention_mask, chunk_size=prefill_chunk, top=cfg.top)[:, -1]
    n_prefill = len(session.stats)
    prefill = _sum_stats(session.stats[:n_prefill])
    while True:
        nxt = stream.sample(logits)
        if stream.finished:
            break
        logits = session.forward(nxt[:, None], top=cfg.top)[:, -1]
    return GenerationResult(stream.tokens(), prefill, session.stats[n_prefill:], stream.all_eos)


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
