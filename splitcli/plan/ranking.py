"""How the planner explains its ranking (`splitcli.plan.enumerate`'s module docstring gives the
order): which rule puts one candidate ahead of another, said for the winner and for each loser."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitcli.units import format_bytes

if TYPE_CHECKING:
    from splitcli.plan.enumerate import Ranked


def total_memory(r: "Ranked") -> float:
    """Edge memory of a costed candidate (inf when it was not costed)."""
    return r.memory.total_bytes if r.memory is not None else math.inf


def format_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


@dataclass(frozen=True)
class Decision:
    """The first ranking rule on which one candidate beats another: `rule` names it for the
    winner ("smaller accuracy drop"), `won` and `lost` say it with the values for each side."""

    rule: str
    won: str
    lost: str


def decide(better: Ranked, worse: Ranked) -> Decision | None:
    """Why `better` ranks ahead of `worse` (module docstring's order); None on a full tie."""
    b, w = better, worse
    if b.psi != w.psi:
        return Decision("higher Psi", f"higher Psi ({b.psi:g} > {w.psi:g})",
                        f"lower Psi ({w.psi:g} < {b.psi:g})")
    lb, lw = b.candidate.split_layer, w.candidate.split_layer
    if lb != lw:
        return Decision("more edge layers", f"same Psi, more edge layers ({lb} > {lw})",
                        f"same Psi, fewer edge layers ({lw} < {lb})")
    if b.accuracy_drop is not None and w.accuracy_drop is not None and b.accuracy_drop != w.accuracy_drop:
        db, dw = f"{100 * b.accuracy_drop:.3g}%", f"{100 * w.accuracy_drop:.3g}%"
        return Decision("smaller accuracy drop", f"same Psi and l, smaller accuracy drop ({db} < {dw})",
                        f"same Psi and l, larger accuracy drop ({dw} > {db})")
    tb, tw = b.latency_s or 0.0, w.latency_s or 0.0
    if tb != tw:
        return Decision("lower predicted latency",
                        f"same Psi, l and accuracy, lower predicted latency ({format_ms(tb)} < {format_ms(tw)} per token)",
                        f"same Psi, l and accuracy, higher predicted latency ({format_ms(tw)} > {format_ms(tb)} per token)")
    wb, ww = b.wire_bytes_per_token, w.wire_bytes_per_token
    if wb != ww:
        return Decision("fewer wire bytes", f"same Psi, l, accuracy and latency, fewer wire bytes/token ({wb:.4g} < {ww:.4g})",
                        f"same Psi, l, accuracy and latency, more wire bytes/token ({ww:.4g} > {wb:.4g})")
    mb, mw = total_memory(b), total_memory(w)
    if mb != mw:
        return Decision("less edge memory",
                        f"same Psi, l, accuracy, latency and wire bytes, less edge memory "
                        f"({format_bytes(mb)} < {format_bytes(mw)})",
                        f"same Psi, l, accuracy, latency and wire bytes, more edge memory "
                        f"({format_bytes(mw)} > {format_bytes(mb)})")
    return None


def why_lost(r: Ranked, best: Ranked, n_layers: int) -> str:
    if r.candidate.config_key(n_layers) == best.candidate.config_key(n_layers):
        return "same edge configuration as the chosen plan (another OPSC spelling of it)"
    decision = decide(best, r)
    return decision.lost if decision else "tie on every rule; lost on enumeration order"
