"""The import graph of ``fguide``: no circles, and no import from a floor up to a higher one.

Every module's source is walked (imports inside functions and under ``TYPE_CHECKING``
included: they are dependencies all the same). Importing ``a.b.c`` also runs the packages
``a.b`` and ``a`` that are not the importer's own, so those count as imported too (unless the
package's ``__init__`` imports nothing: then running it does nothing). The floors
(lowest first) are the layout the README describes: a module may import its own floor and the
floors below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module's floor is that of the longest prefix listed here.
FLOORS: list[tuple[str, ...]] = [
    (  # the sampler core (the mathematics) and the helpers every job shares
        "fguide",
        "fguide._version",
        "fguide.accel",
        "fguide.defaults",
        "fguide.denoisers",
        "fguide.diagnostics",
        "fguide.distributed",
        "fguide.guidance",
        "fguide.io.files",  # atomic writes and provenance: every job writes through it
        "fguide.metrics",
        "fguide.objectives",
        "fguide.params",
        "fguide.rng",
        "fguide.runtime",
        "fguide.samplers",
        "fguide.schedules",
    ),
    ("fguide.io", "fguide.models"),  # files and folders; networks and their file readers
    ("fguide.config", "fguide.families", "fguide.guides", "fguide.plots"),  # the registries
    (  # the jobs
        "fguide.sampling",
        "fguide.finetune",
        "fguide.evaluation",
        "fguide.weights",
        "fguide.weights_download",
    ),
    ("fguide.worlds",),  # the embedded demo worlds (they run the jobs)
    ("fguide.cli",),  # one thin module per command
]
# The old flat paths, kept for one release: nothing in fguide may import them.
DEPRECATED = (
    "fguide.calibration_report",
    "fguide.cfg_guidance",
    "fguide.finetune_config",
    "fguide.finetune_data",
    "fguide.finetune_loop",
    "fguide.finetune_steps",
    "fguide.models.classifiers",
    "fguide.paper_configs",
    "fguide.sampling_config",
    "fguide.sampling_models",
)


def modules(src: Path = SRC) -> dict[str, Path]:
    """Every module of ``fguide`` by dotted name (a package by its own name)."""
    out = {}
    for path in sorted((src / "fguide").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(
    name: str, path: Path, known: set[str], empty: frozenset[str] = frozenset()
) -> set[str]:
    """The fguide modules that importing ``name`` (at ``path``) imports directly."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(stem + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" for a in node.names]
            found.update(n for n in names if n in known)  # submodules imported by name
            if not all(n in known for n in names):
                found.add(base)  # names defined by the module ``base`` itself
    own = set(_ancestors(name)) | {name}
    out: set[str] = set()
    for target in found & known:
        out.add(target)
        out.update(p for p in _ancestors(target) if p not in own and p not in empty)
    out.discard(name)
    return out


def graph(src: Path = SRC) -> dict[str, set[str]]:
    """Each module's direct imports; a package whose ``__init__`` imports nothing runs nothing,
    so importing its modules does not count as importing it."""
    mods = modules(src)
    known = set(mods)
    direct = {name: imports_of(name, path, known) for name, path in mods.items()}
    empty = frozenset(n for n, p in mods.items() if p.name == "__init__.py" and not direct[n])
    return {name: imports_of(name, path, known, empty) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def floor_of(name: str) -> int | None:
    """The floor of module ``name`` (None for a deprecated path)."""
    if any(name == d or name.startswith(d + ".") for d in DEPRECATED):
        return None
    best, floor = -1, None
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), level
    return floor


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Every import of a higher floor, or of a deprecated path, by a module of fguide."""
    out = []
    for name, deps in sorted(edges.items()):
        mine = floor_of(name)
        if mine is None:
            continue  # a deprecated path imports the new home, wherever it is
        for dep in sorted(deps):
            theirs = floor_of(dep)
            if theirs is None or theirs > mine:
                out.append(f"{name} (floor {mine}) imports {dep} (floor {theirs})")
    return out


EDGES = graph()


def test_every_module_has_a_floor() -> None:
    assert [m for m in EDGES if floor_of(m) is None and m not in DEPRECATED] == []


def test_no_import_circles() -> None:
    assert cycles(EDGES) == []


def test_no_import_runs_up_a_floor() -> None:
    assert upward(EDGES) == []


@pytest.mark.parametrize(
    ("extra", "kind"),
    [
        (("fguide.models.loading", "fguide.models.nvlabs"), "circle"),  # issue 19's circles
        (("fguide.io.runs", "fguide.plots"), "up"),
        (("fguide.plots", "fguide.evaluation.calibration"), "up"),
        (("fguide.models.hf_diffusers", "fguide.models.latent_guidance"), "circle"),
        (("fguide.guides.base", "fguide.sampling"), "up"),
        (("fguide.families.adm", "fguide.sampling_models"), "up"),
    ],
)
def test_the_checks_see_an_added_import(extra: tuple[str, str], kind: str) -> None:
    """The checks themselves: one import added to the real graph is found."""
    edges = {k: set(v) for k, v in EDGES.items()}
    edges[extra[0]].add(extra[1])
    if kind == "circle":
        assert any(set(extra) <= set(c) for c in cycles(edges))
    else:
        assert any(line.startswith(extra[0] + " ") for line in upward(edges))


def test_a_function_local_import_counts(tmp_path: Path) -> None:
    pkg = tmp_path / "fguide"
    (pkg / "io").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "plots.py").write_text("from fguide.io import runs\n")
    (pkg / "io" / "runs.py").write_text("def f():\n    from fguide.plots import grid\n")
    edges = graph(tmp_path)
    assert edges["fguide.io.runs"] == {"fguide.plots"}
    assert edges["fguide.plots"] == {"fguide.io.runs"}  # fguide.io's __init__ runs nothing
    assert cycles(edges) == [["fguide.io.runs", "fguide.plots"]]
