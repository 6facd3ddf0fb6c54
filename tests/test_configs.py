"""Every example plan in configs/ loads (with its `include:`) and validates as a Plan; the serve
example (configs/serve*.yaml) loads as a ServeConfig around base.yaml's plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from splitcli.configio import load_config
from splitcli.plan.schema import Plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FILES = sorted(CONFIGS.glob("**/*.yaml"))
SERVES = [p for p in FILES if p.name.startswith("serve")]
PLANS = [p for p in FILES if p not in SERVES]
BASE = CONFIGS / "base.yaml"


def test_configs_exist():
    names = {path.name for path in FILES}
    assert {"base.yaml", "jetson-8gb.yaml", "jetson-4gb.yaml", "phone-2gb.yaml"} <= names


@pytest.mark.parametrize("path", PLANS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_is_a_valid_plan(path):
    plan = Plan.load(path)
    # The planner chose it under its own budget: what it predicted must fit what it was given.
    assert plan.notes["edge_memory_bytes"] <= plan.budgets.memory_bytes
    assert plan.notes["accuracy_drop"] <= plan.budgets.max_accuracy_drop
    # Said in the file: how it was made (the comments hold the command and the assumptions).
    text = path.read_text(encoding="utf-8")
    assert "splitllm plan" in text and "assum" in text.lower()


@pytest.mark.parametrize("path", [p for p in PLANS if p != BASE], ids=lambda p: p.name)
def test_variants_include_the_base_and_override_only_what_differs(path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert raw["include"] == "base.yaml"
    base = load_config(BASE)
    for key, value in raw.items():
        if key != "include" and not isinstance(value, dict):
            assert base.get(key) != value, f"{path.name} repeats base's {key}: {value!r}"
    # The merge is deep: a variant's budgets replace base's keys one by one, none leaks through
    # unless the variant means it (a device variant sets its own memory and deadline).
    merged = load_config(path)
    assert merged["budgets"]["memory_bytes"] == raw["budgets"]["memory_bytes"]
    assert set(merged["notes"]) == set(base["notes"]) == set(raw["notes"])


def test_variants_differ_by_device_budget():
    budgets = {p.name: Plan.load(p).budgets.memory_bytes for p in PLANS}
    assert budgets["phone-2gb.yaml"] < budgets["jetson-4gb.yaml"] < budgets["jetson-8gb.yaml"] < budgets["base.yaml"]


def test_readme_describes_every_config():
    readme = (CONFIGS.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Example configs", 1)[1].split("\n## ", 1)[0]
    for path in FILES:
        assert f"configs/{path.relative_to(CONFIGS)}" in section


def test_serve_example_holds_both_servers_settings_and_includes_the_plan():
    from splitcli.serve.config import ServeConfig
    from splitcli.units import parse_size, parse_time

    assert [p.name for p in SERVES] == ["serve.yaml"]
    path = SERVES[0]
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert raw["include"] == "base.yaml" and set(raw) == {"include", "serve"}
    config = ServeConfig.load(path)
    assert config.plan == Plan.load(BASE) and config.format_version == raw["serve"]["format_version"] == 1
    cloud, edge = raw["serve"]["cloud"], raw["serve"]["edge"]
    c, e = config.cloud, config.edge
    assert (c.host, c.port, c.api_key_env, c.max_sessions, c.max_batch, c.metrics_port) == (
        cloud["host"], cloud["port"], cloud["api_key_env"], cloud["max_sessions"], cloud["max_batch"],
        cloud["metrics_port"])
    assert c.kv_budget_bytes == parse_size(cloud["kv_budget"]) and c.max_message_bytes == parse_size(cloud["max_message"])
    assert c.idle_timeout_s == parse_time(cloud["idle_timeout"]) and c.drain_timeout_s == parse_time(cloud["drain_timeout"])
    assert c.batch_window_ms == pytest.approx(1e3 * parse_time(cloud["batch_window"]))
    assert (e.host, e.port, e.cloud, e.max_running, e.eps) == (edge["host"], edge["port"], edge["cloud"],
                                                               edge["max_running"], edge["eps"])
    assert e.deadline_s == parse_time(edge["deadline"]) == Plan.load(BASE).budgets.deadline_s
    assert e.cloud == f"{c.host}:{c.port}"  # the edge points at the cloud of the same file
