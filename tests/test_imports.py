"""No import circle among the packages (common, actors, replay_server, learner), read statically
from the source: every import of a project module counts, at module level or inside a function
(an import moved into a function to dodge a circle is still a circle), and importing a.b.c runs
a and a.b first. Imports under `if TYPE_CHECKING:` never run (they serve annotations) and do not
count."""

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "actors", "replay_server", "learner")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules its source imports (and their parent packages)."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text())
        type_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block)
                     for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's own package upwards
                    base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                targets = [f"{base_name}.{alias.name}" if f"{base_name}.{alias.name}" in files else base_name
                           for alias in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # a.b.c runs a, a.b, a.b.c
                    dep = ".".join(parts[:i])
                    if dep in files and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, each module importing the next, the first repeated last; or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(reversed(exc.args[1]))  # graphlib lists each module before the one importing it
    return None


def test_no_import_circle():
    found = circle(import_graph())
    assert found is None, "import circle: " + " -> ".join(found)


def test_the_check_finds_a_circle_dodged_inside_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert sorted(set(circle(graph))) == ["pkg.a", "pkg.b"]
    assert graph["pkg.c"] == {"pkg.a"}  # its own package is already running
