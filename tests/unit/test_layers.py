"""The import graph follows the layers of DESIGN.md: read from the source with ast, every import
(also those inside functions) is an edge; no edge goes up a layer, train and eval never import each
other, and no module imports itself back through a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Layer of each top-level unit, bottom = 0. Units in one layer may import each other, except the
# pairs in SEPARATE.
LAYERS = {
    "radiodiff.config": 0, "radiodiff.dist": 0, "radiodiff.metrics": 0, "radiodiff.precision": 0,
    "radiodiff.cli": 0, "radiodiff.launch": 0,
    "radiodiff.data": 1, "radiodiff.models": 1, "radiodiff.losses": 1, "radiodiff.diffusion": 1,
    "radiodiff.runs": 2,
    "radiodiff.train": 3, "radiodiff.eval": 3,
    "pipeline": 4,
    "tools": 5,
}
SEPARATE = {frozenset({"radiodiff.train", "radiodiff.eval"})}
FORBIDDEN_IN_LIBRARY = ("ray", "pipeline")  # the library never imports the orchestration layer


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str | None:
    for unit in sorted(LAYERS, key=len, reverse=True):
        if module == unit or module.startswith(unit + "."):
            return unit
    return None


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def project_graph() -> dict[str, set[str]]:
    files = [*REPO.glob("radiodiff/**/*.py"), *REPO.glob("pipeline/**/*.py"), *REPO.glob("tools/*.py")]
    modules = {module_name(p): p for p in files}
    if "tools.bench" in modules:  # tools are scripts that import their siblings by bare name
        siblings = {name.split(".")[1] for name in modules if name.startswith("tools.")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imported in imports_of(path):
            if name.startswith("tools.") and imported.split(".")[0] in siblings:
                imported = f"tools.{imported}"
            if imported in modules:
                edges.add(imported)
        graph[name] = edges
    return graph


def test_no_import_goes_up_a_layer_and_train_eval_stay_apart() -> None:
    bad = []
    for module, edges in project_graph().items():
        source = unit_of(module)
        for target in edges:
            target_unit = unit_of(target)
            if source is None or target_unit is None or source == target_unit:
                continue
            if LAYERS[target_unit] > LAYERS[source] or frozenset({source, target_unit}) in SEPARATE:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_library_never_imports_ray_or_pipeline() -> None:
    bad = [f"{p.relative_to(REPO)}: {name}" for p in REPO.glob("radiodiff/**/*.py") for name in imports_of(p)
           if name.split(".")[0] in FORBIDDEN_IN_LIBRARY]
    assert not bad, "\n".join(bad)


def test_no_import_cycle() -> None:
    graph = project_graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            # A package's __init__ re-exporting its own submodules is not a cycle of concern.
            if node.startswith(nxt + ".") or nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if state.get(nxt) is None:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_layer_check_catches_a_forbidden_edge(tmp_path: Path) -> None:
    """The checker itself: an eval -> train import is reported."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from radiodiff.train.loop import Stage\n")
    assert "radiodiff.train.loop" in imports_of(source)
    assert frozenset({unit_of("radiodiff.eval.x"), unit_of("radiodiff.train.loop")}) in SEPARATE
