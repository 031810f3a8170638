"""The layer rule of docs/architecture.md: no module imports one from a layer above its own.

Every `import kolite...` counts, at module level, inside functions and under TYPE_CHECKING alike: a
function-level import hides a loop, it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kolite"

# Higher numbers are higher layers; units on one level may not import each other.
LEVELS = {
    "cli": 7,
    "api": 6, "bench": 6,
    "service": 5, "web": 5,
    "convert": 4,
    "engine": 3, "chat": 3,
    "tokenizer": 2,
    "models": 1,
    "config": 0, "errors": 0,
}


def _unit(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, kolite unit) of every kolite import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "kolite" else [f"kolite.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "kolite" and len(parts) > 1 and parts[1] != "__init__":
                out.append((node.lineno, parts[1]))
    return out


MODULES = sorted(p for p in SRC.rglob("*.py") if _unit(p) != "__init__")


def test_every_unit_has_a_level() -> None:
    units = {_unit(p) for p in MODULES}
    assert units <= set(LEVELS), f"give these a level in LEVELS and docs/architecture.md: {units - set(LEVELS)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down(path: Path) -> None:
    unit = _unit(path)
    upward = [f"line {line}: {unit} imports {target}" for line, target in _imports(path)
              if target != unit and target in LEVELS and LEVELS[target] >= LEVELS[unit]]
    assert not upward, "; ".join(upward)


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a models module importing the engine is found."""
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from kolite.engine.runtime import GPT2Runtime\n", encoding="utf-8")
    assert _imports(fake) == [(2, "engine")] and LEVELS["engine"] >= LEVELS["models"]
