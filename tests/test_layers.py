"""The layers of docs/architecture.md, as the code has them: a module imports only from its own layer or lower
ones, never upward (not even inside a function), and no import cycle exists between modules. Imports made only
for type checkers (under ``if TYPE_CHECKING:``) are not imports at run time and are not counted."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

# Lowest first; a package (opslib/migrate/, …) is one module of its layer. docs/architecture.md shows the same.
LAYERS = {
    "base": {"outcome", "errors", "redact", "naming", "notebooks", "kernelfiles", "witness", "halt", "record", "runcontext", "lazy",
             "config", "params", "policy", "checkreport", "safeguards", "signals", "sshsig", "approval"},
    "database": {"embedded", "db", "schema", "pgtools", "pgbackrest", "history"},
    "verbs": {"batch", "migrate", "backup", "seed", "rehearse", "branch", "plans"},
    "judgement": {"lint", "checks"},
    "rendering": {"display"},
    "records": {"audit", "signatures", "runlist", "liveness", "anchors", "restorepoints", "sealing", "report", "summary", "autoseal"},
    "runs": {"steps", "workflows", "runbook", "runner", "lab", "fleet", "airflow"},
    "face": {"cli"},
}  # fmt: skip
RANK = {name: i for i, layer in enumerate(LAYERS.values()) for name in layer}
PACKAGE = ROOT / "opslib"


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST, module: str) -> set[str]:
    """The opslib modules ``module`` imports at run time (dotted names), wherever in the file."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("opslib.")}
        elif _is_lazy_import(node):  # migrate = lazy.module("opslib.migrate"): an import, made at first use
            found.add(node.args[0].value)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("opslib"):
            # `from opslib.cli import runs` imports the submodule; `from opslib.cli import main`, the package.
            subs = {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
            found |= subs or ({node.module} if node.module != "opslib" else set())
    return {f for f in found if f != module}


def _is_lazy_import(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and ast.unparse(node.func) == "lazy.module"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Constant)
        and str(node.args[0].value).startswith("opslib.")
    )


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_of(path)
        graph[module] = _runtime_imports(ast.parse(path.read_text()), module)
    return graph


def _top(module: str) -> str:
    """The module of the layer table a dotted module belongs to (opslib.migrate.verbs -> migrate)."""
    return module.split(".")[1] if module.count(".") else module


def test_every_module_has_a_layer():
    assert sorted({_top(m) for m in _graph() if m != "opslib"} - set(RANK)) == []


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{module} ({_layer(module)}) imports {dep} ({_layer(dep)})"
        for module, deps in _graph().items()
        if module != "opslib"
        for dep in deps
        if RANK[_top(dep)] > RANK[_top(module)]
    ]
    assert upward == []


def test_no_import_cycle_between_modules():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # A package's __init__ re-exports its submodules: a submodule importing it back would be the cycle.
    assert cycles == []


def test_the_check_sees_an_upward_import():
    tree = ast.parse(
        "from opslib import cli\nif TYPE_CHECKING:\n    from opslib.steps import Run\nlint = lazy.module('opslib.lint')\n"
    )
    found = _runtime_imports(tree, "opslib.db")
    assert found == {"opslib.cli", "opslib.lint"} and RANK[_top("opslib.cli")] > RANK[_top("opslib.db")]


def _layer(module: str) -> str:
    return next(name for name, members in LAYERS.items() if _top(module) in members)


def test_no_module_over_800_lines_and_no_function_over_60():
    """The size the review holds the code to: a module that grows past 800 lines is split by what it holds, a
    function past 60 into steps named for what they do."""
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 800:
            long_modules.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert (long_modules, long_functions) == ([], [])
