"""Imports flow one way: the CLI and the benchmark scripts (drivers) -> recipes/ -> components. Read from the
source (ast), imports inside functions included, so a cycle cannot hide behind a late import."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moekd_ray"
DRIVERS = {"moekd_ray.cli", "moekd_ray.bench", "moekd_ray.bench_gpu"}


def module_imports() -> dict[str, set[str]]:
    """Each moekd_ray module -> the moekd_ray modules it imports anywhere in its file."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moekd_ray"):
                found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in names and m != name and m != "moekd_ray"}
    return graph


def is_recipe(name: str) -> bool:
    return name.startswith("moekd_ray.recipes")


def test_components_import_no_recipe_and_no_driver():
    graph = module_imports()
    wrong = {(m, d) for m, deps in graph.items() if not is_recipe(m) and m not in DRIVERS
             for d in deps if is_recipe(d) or d in DRIVERS}
    assert not wrong, f"components importing recipes or drivers: {sorted(wrong)}"
    assert not {(m, d) for m, deps in graph.items() if is_recipe(m) for d in deps if d in DRIVERS}


def test_no_import_cycle():
    graph, state, cycles = module_imports(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
    assert len(graph) > 20 and any(is_recipe(m) for m in graph)  # the walk saw the package
