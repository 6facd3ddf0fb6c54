"""Every example plan in configs/ loads (with its `include:`) and validates as a Plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from splitcli.configio import load_config
from splitcli.plan.schema import Plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FILES = sorted(CONFIGS.glob("**/*.yaml"))
BASE = CONFIGS / "base.yaml"


def test_configs_exist():
    names = {path.name for path in FILES}
    assert {"base.yaml", "jetson-8gb.yaml", "jetson-4gb.yaml", "phone-2gb.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_is_a_valid_plan(path):
    plan = Plan.load(path)
    # The planner chose it under its own budget: what it predicted must fit what it was given.
    assert plan.notes["edge_memory_bytes"] <= plan.budgets.memory_bytes
    assert plan.notes["accuracy_drop"] <= plan.budgets.max_accuracy_drop
    # Said in the file: how it was made (the comments hold the command and the assumptions).
    text = path.read_text(encoding="utf-8")
    assert "splitllm plan" in text and "assum" in text.lower()


@pytest.mark.parametrize("path", [p for p in FILES if p != BASE], ids=lambda p: p.name)
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
    budgets = {p.name: Plan.load(p).budgets.memory_bytes for p in FILES}
    assert budgets["phone-2gb.yaml"] < budgets["jetson-4gb.yaml"] < budgets["jetson-8gb.yaml"] < budgets["base.yaml"]


def test_readme_describes_every_config():
    readme = (CONFIGS.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Example configs", 1)[1].split("\n## ", 1)[0]
    for path in FILES:
        assert f"configs/{path.relative_to(CONFIGS)}" in section
