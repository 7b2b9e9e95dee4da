"""The library's import graph has no circles, and the library never imports the application layer.

Every ``import par.x`` / ``from par.x import`` counts, also inside functions: a function-level
import still makes one module depend on another, it only hides the circle until run time.
"""
import ast
from pathlib import Path

from conftest import REPO



def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = Path(REPO) / "par") -> dict:
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from par import x` imports the module par.x when there is one
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges - {"par"}  # the package itself only defines names
    return graph


def find_cycle(graph: dict):
    """A list of modules forming a circle, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_sees_circles_and_function_level_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    package = tmp_path / "par"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "one.py").write_text("def f():\n    from par.two import g\n")
    (package / "two.py").write_text("from par import one\n")
    graph = import_graph(package)
    assert graph["par.one"] == {"par.two"} and graph["par.two"] == {"par.one"}
    assert find_cycle(graph) == ["par.one", "par.two", "par.one"]


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 20
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_library_never_imports_the_application_layer():
    graph = import_graph()
    application = {m for m in graph if m == "par.__main__" or m == "par.app" or m.startswith("par.app.")}
    assert {"par.app.cli", "par.app.bench", "par.app.pipeline", "par.app.demo"} <= application
    offenders = {m: sorted(deps & application) for m, deps in graph.items() if m not in application and deps & application}
    assert not offenders, f"library modules importing the CLI/pipeline layer: {offenders}"


def test_utils_is_the_bottom_layer():
    assert import_graph()["par.utils"] <= {"par.errors"}
