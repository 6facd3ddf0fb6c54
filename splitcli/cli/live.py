"""`generate --deadline D --link SPEC`: Algorithm 2 live on an emulated link, with a trace;
`generate --cloud HOST:PORT --deadline D`: the same policy on the measured network link
(`--link` then shapes the uplink in real time on top of the real one).

The options are checked before any model loads; the loops are `runtime.adaptive` (in process)
and `serve.adaptive` (over the network).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SplitLLMError
from .common import check_output_path, err_console

DEFAULT_EPS = 1e-3


@dataclass(frozen=True)
class LiveOptions:
    deadline_s: float
    link: object  # runtime.link.LinkSpec (with --cloud: an optional shaper, else None)
    eps: float
    i_kv: int
    q_bar: int
    q_bar_min: int
    local_tokens: int
    trace: Path | None


def live_options(plan, spec, deadline, link, eps, i_kv, local_tokens, trace, force, from_shards,
                 remote: bool = False) -> LiveOptions | None:
    """The live policy's settings (plan defaults, flags win), or None for a plain generation.
    `remote` (--cloud): the link is measured, so --deadline alone suffices; --link shapes it."""
    from ..runtime.link import parse_link
    from ..units import parse_time

    if deadline is None and (link is None or remote):
        stray = [flag for flag, v in (("--eps", eps), ("--i-kv", i_kv), ("--trace", trace), ("--link", link))
                 if v is not None]
        stray += ["--local-tokens"] if local_tokens else []
        if stray:
            need = "--deadline" if remote else "--deadline and --link"
            raise SplitLLMError(f"{', '.join(stray)} steer the live policy: give {need} too")
        return None
    if deadline is None or (link is None and not remote):
        raise SplitLLMError("--deadline and --link go together: the live policy needs a deadline and a link to measure "
                            "(or --cloud HOST:PORT, whose link it measures)")
    try:
        deadline_s = parse_time(deadline)
    except SplitLLMError as e:
        raise SplitLLMError(f"--deadline: {e}") from None
    if not deadline_s > 0:
        raise SplitLLMError(f"--deadline must be > 0, got {deadline!r}")
    eps = DEFAULT_EPS if eps is None else eps
    if not 0 < eps < 1:
        raise SplitLLMError(f"--eps must lie in (0, 1), got {eps}")
    i_kv = (plan.i_kv if plan is not None else 1) if i_kv is None else i_kv
    if i_kv not in (0, 1):
        raise SplitLLMError(f"--i-kv must be 0 or 1, got {i_kv}")
    if local_tokens < 0:
        raise SplitLLMError(f"--local-tokens must be >= 0, got {local_tokens}")
    if local_tokens and from_shards:
        raise SplitLLMError("--local-tokens needs an edge holding every layer: run from --model, not --shards")
    check_output_path(trace, force)
    try:
        link_spec = parse_link(link) if link is not None else None
    except SplitLLMError as e:
        raise SplitLLMError(f"--link: {e}") from None
    return LiveOptions(deadline_s, link_spec, eps, i_kv, spec.codec.q_bar, spec.codec.q_bar_min,
                       local_tokens, trace)


def run_live(live: LiveOptions, lm, split, ids, mask, cfg, eos):
    """Generate with Algorithm 2 deciding every step; prints the trace and its summary."""
    from ..deploy import handoff_session
    from ..plan.early_exit import ExitPolicy
    from ..runtime.adaptive import adaptive_generate, link_model_for
    from ..runtime.fast import fast_split_session
    from ..runtime.link import EmulatedLink

    policy = ExitPolicy(live.deadline_s, live.q_bar, live.q_bar_min, live.i_kv, link_model_for(live.link, live.eps))
    session = handoff_session(lm, split) if live.local_tokens else fast_split_session(split)
    result = adaptive_generate(session, ids, mask, cfg, policy, EmulatedLink(live.link),
                               local_tokens=live.local_tokens, eos_token_ids=eos)
    return _report(live, result, f"live policy: D = {live.deadline_s * 1e3:g} ms, link {live.link.describe()}, "
                                 f"eps {live.eps:g}, wire {split.wire.name}")


def run_live_remote(live: LiveOptions, lm, split, ids, cfg, eos, cloud):
    """Algorithm 2 on the measured link to a serve-cloud (`serve.adaptive`): the tokens and the
    trace, printed as `run_live` prints it."""
    from ..plan.early_exit import ExitPolicy
    from ..runtime.adaptive import measured_link_model
    from ..serve.adaptive import LiveRun, RemotePolicy
    from ..serve.client import generate_remote
    from ..serve.handoff import generate_remote_handoff

    policy = ExitPolicy(live.deadline_s, live.q_bar, live.q_bar_min, live.i_kv, measured_link_model(live.eps))
    run = LiveRun(RemotePolicy(policy, live.link), split)
    if live.local_tokens:
        from ..deploy.split import opsc_edge_model

        tokens = list(generate_remote_handoff(split, opsc_edge_model(lm.model, split.spec), ids, cfg, cloud,
                                              local_tokens=live.local_tokens, i_kv=live.i_kv, eos_token_ids=eos,
                                              live=run))
    else:
        tokens = list(generate_remote(split, ids, cfg, cloud, eos_token_ids=eos, live=run))
    result = run.result(tokens)
    shaped = f", uplink shaped by {live.link.describe()}" if live.link is not None else ""
    return _report(live, result, f"live policy on the measured link to {cloud.target}: "
                                 f"D = {live.deadline_s * 1e3:g} ms{shaped}, wire {split.wire.name}")


def _report(live: LiveOptions, result, header: str):
    """The header, the per-step table and summary on stderr; the trace file when asked."""
    from ..runtime.adaptive import format_trace, write_trace

    err_console.print(header, highlight=False)
    for line in format_trace(result):
        err_console.print(line, highlight=False, markup=False)
    if live.trace is not None:
        write_trace(live.trace, result)
        err_console.print(f"wrote {live.trace}", highlight=False)
    return result
