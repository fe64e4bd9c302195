"""Imports flow one way: the CLI and the benchmark scripts -> recipes/ (drivers) -> stages/ -> components, and no
recipe imports another. Read from the source (ast), imports inside functions included, so a cycle cannot hide
behind a late import."""

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


def layer(name: str) -> int:
    """3: the CLI and scripts, 2: recipes (drivers), 1: stages, 0: components."""
    if name in DRIVERS:
        return 3
    return 2 if is_recipe(name) else 1 if name.startswith("moekd_ray.stages") else 0


def test_imports_only_go_down_the_layers():
    """No component imports a stage, recipe or driver; no stage imports a recipe or driver; no recipe a driver."""
    graph = module_imports()
    wrong = sorted((m, d) for m, deps in graph.items() for d in deps if layer(d) > layer(m))
    assert not wrong, f"imports going up a layer: {wrong}"
    assert {layer(m) for m in graph} == {0, 1, 2, 3}  # every layer is there


def test_no_recipe_imports_another():
    """Recipes are drivers side by side: what two of them share lives in stages/ (the pipeline a search runs
    first is handed in by the CLI)."""
    graph = module_imports()
    recipes = [m for m in graph if is_recipe(m)]
    wrong = sorted((m, d) for m in recipes for d in graph[m] if is_recipe(d))
    assert not wrong, f"recipes importing recipes: {wrong}"
    assert len(recipes) >= 4  # the walk saw the recipes


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
