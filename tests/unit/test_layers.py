"""The import graph of the package: no cycles, no import up the layers, none hidden in a function.

Layers, lowest first: model < tiling < helpers < data < distill < train / export < artifacts
< backends < eval / bench / serve < commands. The helpers (config, errors, utils, console,
environment, version, paths) cut across and import nothing above tiling.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "zturbo"

LAYERS = {
    "model": 0,
    "tiling": 1,  # tiled encode and decode: reads the model's layer walk
    "version": 2,
    "errors": 2,
    "config": 2,
    "utils": 2,
    "paths": 2,  # paths read from data files, kept inside the folder they belong to
    "console": 2,
    "environment": 2,
    "data": 3,
    "perceptual": 3,  # the LPIPS network, used by the training loss and the eval metric
    "adapters": 3,  # the model behind the interface diffusers pipelines call
    "distill": 4,  # teacher -> student; training calls it through student_settings / load_student
    "train": 5,
    "export": 5,
    "artifacts": 6,  # knows the run layout (train) and the export layout (export)
    "backends": 7,
    "eval": 8,
    "bench": 8,
    "serve": 8,
    "commands": 9,
    "cli": 9,
    "__main__": 9,
    "": 9,  # the package root: the public API re-exports from every layer
}
# Commands and the CLI may import lazily (a command's start-up stays fast).
LAZY_ALLOWED = ("zturbo.commands", "zturbo.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return LAYERS[top]


def _target(node: ast.ImportFrom | ast.Import) -> list[str]:
    """The zturbo modules an import statement names (``from zturbo.train import checkpoint`` -> the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "zturbo"]
    if node.level or not node.module or node.module.split(".")[0] != "zturbo":
        return []
    return [
        f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
    ]


def _imports() -> list[tuple[str, str, bool, int]]:
    """(importer, imported, inside a function, line) for every zturbo import in the package."""
    edges = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_function = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_function.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges += [(module, t, id(node) in in_function, node.lineno) for t in _target(node)]
    return edges


EDGES = _imports()


def test_every_module_has_a_layer():
    assert {m: _layer(m) for m in MODULES}


def test_imports_only_go_down_the_layers():
    upward = [
        f"{a}:{line} imports {b} (layer {_layer(a)} -> {_layer(b)})"
        for a, b, _, line in EDGES
        if _layer(b) > _layer(a)
    ]
    assert not upward, "\n".join(upward)


def test_model_imports_nothing_else_of_the_project():
    outside = [
        f"{a}:{line} imports {b}"
        for a, b, _, line in EDGES
        if a.startswith("zturbo.model") and not b.startswith("zturbo.model")
    ]
    assert not outside, "\n".join(outside)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _, _ in EDGES:
        if a != b:
            graph[a].add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_no_project_import_hidden_in_a_function():
    hidden = [
        f"{a}:{line} imports {b} inside a function"
        for a, b, inside, line in EDGES
        if inside and not a.startswith(LAZY_ALLOWED)
    ]
    assert not hidden, "\n".join(hidden)


def test_the_checker_reads_the_imports_it_judges():
    # A checker that parsed nothing would pass every test above.
    known = {(a, b, inside) for a, b, inside, _ in EDGES}
    assert ("zturbo.backends.onnx_backend", "zturbo.export.pipeline", False) in known
    assert (
        "zturbo.train.loop",
        "zturbo.train.checkpoint",
        False,
    ) in known  # `from zturbo.train import checkpoint`
    assert any(inside for a, _, inside, _ in EDGES if a.startswith("zturbo.commands"))
    assert ("zturbo.train.loop", "zturbo.distill", False) in known  # `from zturbo.distill import ...`
