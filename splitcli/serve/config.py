"""Serving settings: what one cloud server enforces (`CloudSettings`) and the serve config file
that `serve-cloud --config` and `serve-edge --config` read (`ServeConfig`).

A serve config is a YAML file with a `serve:` section and a plan beside it, usually by
`include:` (configs/serve.yaml includes base.yaml):

    include: base.yaml
    serve:
      format_version: 1
      cloud: {port: 50051, max_sessions: 8, kv_budget: 1GiB, idle_timeout: 60s, ...}
      edge:  {port: 8000, cloud: "127.0.0.1:50051", deadline: 200ms, ...}

Sizes and times take units (`1GiB`, `60s`, `2ms`) or bare numbers (bytes, seconds). Relative
file paths (TLS certificate, key, CA) are relative to the serve config given to the command.
Keys are checked: an unknown one is an error
that names the known ones, and `null` ("off") is taken only by keys whose default is null. A file without `serve:` is a bare plan (every serve setting at its
default), so both commands still take a plain plan.yaml. The one overlay rule applies: the file
sets the defaults, explicit flags win (`configio.overlay`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from splitcli.errors import SplitLLMError
from splitcli.plan._validate import check_int, check_number

SERVE_FORMAT_VERSION = 1
API_KEY_ENV = "SPLITLLM_API_KEY"


@dataclass(frozen=True)
class CloudSettings:
    """What one cloud server enforces. `api_key` is required: no token, no service."""

    model_sha256: str
    api_key: str
    max_sessions: int = 8
    kv_budget_bytes: int = 1 << 30
    idle_timeout_s: float = 60.0
    max_message_bytes: int = 4 << 20
    max_frame_bytes: int = 64 << 20
    batch_window_ms: float = 2.0
    max_batch: int = 16
    max_top_k: int = 64

    def __post_init__(self) -> None:
        if not self.model_sha256:
            raise SplitLLMError("the cloud needs the model's sha256 to check sessions against")
        if not self.api_key:
            raise SplitLLMError("the cloud needs an API key (bearer token); refusing to serve without one")
        for name in ("max_sessions", "kv_budget_bytes", "max_message_bytes", "max_frame_bytes", "max_batch",
                     "max_top_k"):
            check_int(getattr(self, name), f"cloud setting {name}", 1)
        check_number(self.idle_timeout_s, "cloud setting idle_timeout_s", 0, strict=True)
        if not 0 <= self.batch_window_ms <= 1000:
            raise SplitLLMError(f"cloud setting batch_window_ms must lie in [0, 1000], got {self.batch_window_ms!r}")
        if self.max_frame_bytes < self.max_message_bytes:
            raise SplitLLMError("cloud setting max_frame_bytes must be >= max_message_bytes")


#: CloudSettings' own defaults: the config's limits default to them (one place for each number).
_LIMITS = {f.name: f.default for f in dataclasses.fields(CloudSettings) if f.default is not dataclasses.MISSING}


def check_port(what: str, value, optional: bool = False) -> None:
    """A TCP port in [0, 65535] (0: pick a free one); None passes when `optional`."""
    if value is None and optional:
        return
    check_int(value, what, 0, 65535)


def check_target(what: str, value) -> str:
    """HOST:PORT (a cloud server's address), returned as given."""
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SplitLLMError(f"{what} expects HOST:PORT, got {value!r}")
    return value


def _check_env_name(what: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or not value.replace("_", "a").isalnum() or value[0].isdigit():
        raise SplitLLMError(f"{what} must name an environment variable (letters, digits, _), got {value!r}")


@dataclass(frozen=True)
class CloudConfig:
    """`serve-cloud`'s settings (the `serve.cloud` section; flags of the same meaning win)."""

    host: str = "127.0.0.1"
    port: int = 50051
    api_key_env: str = API_KEY_ENV      # the variable holding the bearer token (--api-key wins)
    # the server's limits (CloudSettings' fields of the same name, and their defaults)
    max_sessions: int = _LIMITS["max_sessions"]
    kv_budget_bytes: int = _LIMITS["kv_budget_bytes"]
    idle_timeout_s: float = _LIMITS["idle_timeout_s"]
    batch_window_ms: float = _LIMITS["batch_window_ms"]
    max_batch: int = _LIMITS["max_batch"]
    max_message_bytes: int = _LIMITS["max_message_bytes"]
    drain_timeout_s: float = 30.0
    metrics_port: int | None = None     # None: no /metrics, /health
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise SplitLLMError(f"serve.cloud.host must be a non-empty address, got {self.host!r}")
        check_port("serve.cloud.port", self.port)
        check_port("serve.cloud.metrics_port", self.metrics_port, optional=True)
        _check_env_name("serve.cloud.api_key_env", self.api_key_env)
        check_number(self.drain_timeout_s, "serve.cloud.drain_timeout")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SplitLLMError("serve.cloud: TLS needs both tls_cert and tls_key")
        # the server's own limits, checked by the type that enforces them
        self.settings("-", "-")

    def settings(self, model_sha256: str, api_key: str) -> CloudSettings:
        """The CloudSettings these limits make (a frame may always be as large as one message)."""
        limits = {name: getattr(self, name) for name in _LIMITS if hasattr(self, name)}
        return CloudSettings(model_sha256=model_sha256, api_key=api_key, **limits,
                             max_frame_bytes=max(_LIMITS["max_frame_bytes"], self.max_message_bytes))


@dataclass(frozen=True)
class EdgeConfig:
    """`serve-edge`'s settings (the `serve.edge` section; flags of the same meaning win)."""

    host: str = "127.0.0.1"
    port: int = 8000
    cloud: str = "127.0.0.1:50051"
    api_key_env: str = API_KEY_ENV              # the edge API's key (--api-key wins)
    cloud_api_key_env: str | None = None        # None: the edge's own key goes to the cloud too
    cloud_ca: Path | None = None                # PEM to trust: talk to the cloud over TLS
    max_running: int = 8
    model_name: str | None = None
    deadline_s: float | None = None             # Algorithm 2 per request on the measured link
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise SplitLLMError(f"serve.edge.host must be a non-empty address, got {self.host!r}")
        check_port("serve.edge.port", self.port)
        check_target("serve.edge.cloud", self.cloud)
        _check_env_name("serve.edge.api_key_env", self.api_key_env)
        _check_env_name("serve.edge.cloud_api_key_env", self.cloud_api_key_env, optional=True)
        check_int(self.max_running, "serve.edge.max_running", 1)
        if self.model_name is not None and (not isinstance(self.model_name, str) or not self.model_name):
            raise SplitLLMError(f"serve.edge.model_name must be a non-empty string, got {self.model_name!r}")
        if self.deadline_s is not None:
            check_number(self.deadline_s, "serve.edge.deadline", 0, strict=True)
        if not (isinstance(self.eps, float) and 0 < self.eps < 1):
            raise SplitLLMError(f"serve.edge.eps must lie in (0, 1), got {self.eps!r}")


#: YAML key -> (field, parser): sizes and times take units; everything else is taken as written.
def _size(v):
    from splitcli.units import parse_size

    return parse_size(v)


def _time(v):
    from splitcli.units import parse_time

    return parse_time(v)


def _ms(v):
    return _time(v) * 1e3


def _path(v, base: Path):
    if not isinstance(v, str) or not v:
        raise SplitLLMError(f"expected a file path, got {v!r}")
    p = Path(os.path.expanduser(v))
    return p if p.is_absolute() else base / p


_CLOUD_KEYS = {"host": ("host", None), "port": ("port", None), "api_key_env": ("api_key_env", None),
               "max_sessions": ("max_sessions", None), "kv_budget": ("kv_budget_bytes", _size),
               "idle_timeout": ("idle_timeout_s", _time), "batch_window": ("batch_window_ms", _ms),
               "max_batch": ("max_batch", None), "max_message": ("max_message_bytes", _size),
               "drain_timeout": ("drain_timeout_s", _time), "metrics_port": ("metrics_port", None),
               "tls_cert": ("tls_cert", _path), "tls_key": ("tls_key", _path)}
_EDGE_KEYS = {"host": ("host", None), "port": ("port", None), "cloud": ("cloud", None),
              "api_key_env": ("api_key_env", None), "cloud_api_key_env": ("cloud_api_key_env", None),
              "cloud_ca": ("cloud_ca", _path), "max_running": ("max_running", None),
              "model_name": ("model_name", None), "deadline": ("deadline_s", _time), "eps": ("eps", float)}


#: What a key takes, for "must be a time, got null": by its parser, else by its field's type.
_KINDS = {_size: "a size", _time: "a time", _ms: "a time", _path: "a file path", float: "a number"}
_TYPE_KINDS = {"int": "an integer", "float": "a number", "str": "a string"}


def _nullable(cls) -> set[str]:
    """The fields of `cls` whose default is None: for them `null` means "off"; for every other
    field null is an error (it would reach the checks as None and fail with a TypeError)."""
    return {f.name for f in dataclasses.fields(cls) if f.default is None}


def _section(cls, keys: dict, raw, where: str, base: Path):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise SplitLLMError(f"{where} must be a mapping of settings, not a {type(raw).__name__}")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise SplitLLMError(f"{where} has no setting {', '.join(map(repr, unknown))} (settings: {', '.join(keys)})")
    values = {}
    nullable = _nullable(cls)
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        name, parse = keys[key]
        if value is None and name not in nullable:
            kind = _KINDS.get(parse) or _TYPE_KINDS.get(str(types[name]), "a value")
            raise SplitLLMError(f"{where}.{key}: must be {kind}, got null (leave the key out for the default)")
        if value is not None and parse is not None:
            try:
                value = parse(value, base) if parse is _path else parse(value)
            except (SplitLLMError, TypeError, ValueError) as exc:
                raise SplitLLMError(f"{where}.{key}: {exc}") from None
        values[name] = value
    return cls(**values)


@dataclass(frozen=True)
class ServeConfig:
    """A serve config file: the cloud's and the edge's settings and the plan they serve (None:
    the file holds only the serve section; the commands then take ℓ and the codec from flags)."""

    cloud: CloudConfig = field(default_factory=CloudConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    plan: object = None  # splitcli.plan.schema.Plan
    format_version: int = SERVE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != SERVE_FORMAT_VERSION:
            raise SplitLLMError(f"serve config has format_version {self.format_version!r}; "
                                f"this splitllm reads version {SERVE_FORMAT_VERSION}")
        if not isinstance(self.cloud, CloudConfig) or not isinstance(self.edge, EdgeConfig):
            raise SplitLLMError("serve config needs a CloudConfig and an EdgeConfig")

    @classmethod
    def load(cls, path) -> "ServeConfig":
        """A serve config (plan included) or a bare plan.yaml; SplitLLMError names what is wrong."""
        from splitcli.configio import load_config
        from splitcli.plan.schema import Plan

        path = Path(os.path.expanduser(os.fspath(path)))
        data = load_config(path)
        serve = data.pop("serve", None)
        plan = Plan.from_dict(data) if data else None
        if serve is None:
            if plan is None:
                raise SplitLLMError(f"{path} holds neither a plan nor a serve: section")
            return cls(plan=plan)
        if not isinstance(serve, dict):
            raise SplitLLMError(f"serve: in {path} must be a mapping, not a {type(serve).__name__}")
        unknown = sorted(set(serve) - {"format_version", "cloud", "edge"})
        if unknown:
            raise SplitLLMError(f"serve: in {path} has no section {', '.join(map(repr, unknown))} "
                                "(sections: format_version, cloud, edge)")
        if "format_version" not in serve:
            raise SplitLLMError(f"serve: in {path} needs format_version: {SERVE_FORMAT_VERSION}")
        base = path.resolve().parent
        return cls(_section(CloudConfig, _CLOUD_KEYS, serve.get("cloud"), "serve.cloud", base),
                   _section(EdgeConfig, _EDGE_KEYS, serve.get("edge"), "serve.edge", base), plan,
                   serve["format_version"])


def api_key_from(flag: str | None, env: str = API_KEY_ENV) -> str:
    """--api-key, else the environment variable `env`; a server never runs without one."""
    key = flag if flag is not None else os.environ.get(env, "")
    if not key:
        raise SplitLLMError(f"no API key: pass --api-key or set {env} (the server refuses to run without one)")
    return key


__all__ = ["API_KEY_ENV", "CloudConfig", "CloudSettings", "EdgeConfig", "SERVE_FORMAT_VERSION", "ServeConfig",
           "api_key_from"]
