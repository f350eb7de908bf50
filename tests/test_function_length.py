"""No function in ``fguide`` is longer than 120 lines (its ``def`` to its last line, docstring
included), except in ``models/adm.py``, a one-to-one port of ADM's code; no source file is
longer than 600 lines, ``models/adm.py`` again excepted. Long ones are split by step, each
part named for what it computes."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fguide"
MAX_FUNCTION_LINES = 120
MAX_FILE_LINES = 600
EXEMPT = {"models/adm.py"}


def long_functions(root: Path = SRC, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (n lines)`` of every function or method over ``limit`` lines."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in EXEMPT:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    out.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_over_120_lines() -> None:
    assert long_functions() == []


def test_no_file_over_600_lines() -> None:
    long = [
        f"{p.relative_to(SRC).as_posix()} ({n} lines)"
        for p in sorted(SRC.rglob("*.py"))
        if p.relative_to(SRC).as_posix() not in EXEMPT
        and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    ]
    assert long == []


def test_the_check_counts_a_long_function(tmp_path: Path) -> None:
    def source(name: str, statements: int, indent: str = "") -> str:
        body = "".join(f"{indent}    x{i} = {i}\n" for i in range(statements))
        return f"{indent}def {name}():\n{body}"

    (tmp_path / "ok.py").write_text(source("f", 119))  # 120 lines
    (tmp_path / "long.py").write_text("class C:\n" + source("g", 120, "    "))  # 121 lines
    assert long_functions(tmp_path) == ["long.py:2 g (121 lines)"]
