"""The package layering, read from the sources: imports only go down.

    errors  <  units, configio, data  <  cost  <  plan  <  quant  <  codec  <  model  <  runtime
    <  deploy  <  serve  <  eval  <  bench  <  cli

Every import counts, also the ones inside functions (they still tie the packages together).
The pure parts stay pure: cost and plan import no torch (nor transformers / numpy-heavy model
code), codec imports no model, eval, runtime or deploy code, quant no eval, runtime or deploy.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "splitcli"
RANK = {"errors": -1, "units": 0, "configio": 0, "data": 0, "cost": 1, "plan": 2, "quant": 3, "codec": 3.5,
        "model": 4, "runtime": 5, "deploy": 6, "serve": 7, "eval": 8, "bench": 9, "cli": 10}
NO_TORCH = ("cost", "plan")
HEAVY = ("torch", "transformers", "safetensors", "accelerate", "gguf")


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    mod = ["splitcli", *path.relative_to(ROOT).with_suffix("").parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod[: len(mod) - node.level]  # ("__init__" counts as the module's own name)
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


def _sources():
    files = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)
    assert files, ROOT
    return files


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down(path):
    pkg = _package(path)
    if pkg == "__init__":
        return  # the top-level package file imports nothing of its own
    assert pkg in RANK, f"{pkg} has no place in the layering: add it to RANK (and the README's Architecture)"
    bad = []
    for line, name in _imports(path):
        parts = name.split(".")
        if parts[0] in HEAVY and pkg in NO_TORCH:
            bad.append(f"line {line}: {name} (the pure {pkg} package imports no {parts[0]})")
        if parts[0] != "splitcli" or len(parts) < 2:
            continue
        target = parts[1]
        if target != pkg and RANK.get(target, 99) >= RANK[pkg]:
            bad.append(f"line {line}: {name} ({pkg} may not import {target}: same level or above)")
    assert not bad, f"{path.relative_to(ROOT)}: " + "; ".join(bad)


def test_the_check_sees_function_level_and_relative_imports(tmp_path):
    # the reader itself: a relative import inside a function is found and named absolutely
    src = ROOT / "cli" / "generate.py"
    names = {n for _, n in _imports(src)}
    assert "splitcli.deploy" in names and "splitcli.runtime.generate" in names
