"""The package's import graph: no circles, and no module importing from a floor above its own.

Read with `ast` over mmtuning_plugin/, function-level and TYPE_CHECKING imports included (a lazy import is
still a dependency). Floors, bottom up: the schema and plugin registry, the model-facing core, the run
session, then views and hosts, the CLI on top; the tiny test builders sit beside the views (the demo and
docgen use them) and the core never imports them. A new module needs a floor here, on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mmtuning_plugin"

# Longest matching module prefix decides the floor.
FLOORS: dict[str, int] = {
    "mmtuning_plugin": 0,  # the package __init__: hookimpl and the version
    "mmtuning_plugin.errors": 0,
    "mmtuning_plugin.hookspecs": 0,
    "mmtuning_plugin.model_config": 0,
    "mmtuning_plugin.files": 0,  # reading the text files a user names, with precise errors
    "mmtuning_plugin.scoring": 0,  # answer matching and E/F/O: plain functions
    "mmtuning_plugin.plugins": 1,
    "mmtuning_plugin.keep.sources": 1,  # reads keep files (errors only): the schema calls it, so bad input fails early
    "mmtuning_plugin.config": 2,  # the schema: the bottom floor of every feature
    "mmtuning_plugin.arch": 3,
    "mmtuning_plugin.loading": 3,
    "mmtuning_plugin.base_view": 3,  # adapters off, 4-bit forwards without grad kept trainable: torch only
    "mmtuning_plugin.names": 4,
    "mmtuning_plugin.methods": 4,  # adapter methods: the registry's built-ins and mmtuning's own PEFT tuners
    "mmtuning_plugin.targets": 5,
    "mmtuning_plugin.quant": 5,
    "mmtuning_plugin.schedules": 5,
    "mmtuning_plugin.selective": 5,  # selective tuning: plans base modules (reads quant), freezes, SPIDER's mask
    "mmtuning_plugin.losses": 5,
    "mmtuning_plugin.keep": 5,  # the keep term: rows, sources, the adapter-off base
    "mmtuning_plugin.probe": 5,  # `layers: auto`: the gradient probe that picks layers before wrapping
    "mmtuning_plugin.sharding": 5,  # FSDP2: units, refusals, a sharded run's gathered save and per-rank resume
    "mmtuning_plugin.evaluate": 6,  # E/F/O of an adapter on user files (mmtune eval, the demo)
    "mmtuning_plugin.session": 6,
    "mmtuning_plugin.host_settings": 6,  # a host's own LoRA keys as the block's defaults: one rule for all hosts
    "mmtuning_plugin.report": 6,  # the JSON reports: inspect-targets and the run report every host writes
    "mmtuning_plugin.console": 7,
    "mmtuning_plugin.spec_input": 7,
    "mmtuning_plugin.report_tables": 7,  # the inspect-targets report drawn as rich tables
    "mmtuning_plugin.boundary": 7,
    "mmtuning_plugin.eval_cli": 7,
    "mmtuning_plugin.testing": 7,
    "mmtuning_plugin.docgen": 7,
    "mmtuning_plugin.convert": 7,
    "mmtuning_plugin.convert.export": 7,  # what vLLM or transformers loads: split and merge composed
    "mmtuning_plugin.integrations": 7,
    "mmtuning_plugin.demo": 7,
    "mmtuning_plugin.cli": 8,
}
CORE_TOP = 6  # config, arch, targets, quant, schedules, losses, session, loading, plugins, errors: floors 0-6


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # `from . import hookspecs` imports a module
                    candidate = f"{source}.{alias.name}"
                    targets.add(candidate if candidate in files else source)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def floor(module: str) -> int:
    matches = [p for p in FLOORS if module == p or module.startswith(p + ".")]
    assert matches, f"{module} has no floor in tests/test_structure.py FLOORS: place it on purpose"
    return FLOORS[max(matches, key=len)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_circles():
    assert cycles(import_graph()) == []


def test_no_module_imports_from_a_floor_above_its_own():
    upward = sorted(f"{source} (floor {floor(source)}) imports {target} (floor {floor(target)})"
                    for source, targets in import_graph().items() for target in targets
                    if floor(target) > floor(source)
                    # a package may import its own submodules (losses/__init__ -> losses.base)
                    and not target.startswith(source + "."))
    assert upward == []


def test_the_core_never_imports_the_cli_the_hosts_the_demo_or_the_test_builders():
    forbidden = ("mmtuning_plugin.cli", "mmtuning_plugin.integrations", "mmtuning_plugin.demo",
                 "mmtuning_plugin.testing", "mmtuning_plugin.convert")
    bad = sorted(f"{source} -> {target}" for source, targets in import_graph().items() if floor(source) <= CORE_TOP
                 for target in targets if target.startswith(forbidden))
    assert bad == []


def test_the_checker_sees_circles_and_function_level_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    # schedule.py once imported session inside a function: such imports are edges too
    source = "def f():\n    from .session import MMTuning\n"
    nodes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert [n.module for n in nodes] == ["session"]
