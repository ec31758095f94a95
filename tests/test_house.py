"""The shape of the house (issue 21): src/app.py keeps the seed's flow, the subsystems live in src/studio/ one module
each, no module imports one that imports it, and the combine tool starts without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def module_name(path: Path) -> str:
    """`app`, `studio.engine.plan`, `tool.combine_layers` (a package's __init__ is the package)."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def local_modules() -> dict[str, Path]:
    return {module_name(path): path for path in SRC.rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every local module `path` imports, at any depth of its code (a function's import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            for end in range(1, len(parts) + 1):  # `import studio.engine.plan` imports studio and studio.engine too
                if ".".join(parts[:end]) in modules:
                    found.add(".".join(parts[:end]))
    found.discard(module_name(path))
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), as a list that starts and ends with the same module;
    None when there is none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return path[path.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"app": {"studio.x", "studio.y"}, "studio.x": {"studio.y"}, "studio.y": set()}) is None


def test_no_module_of_src_imports_one_that_imports_it():
    modules = local_modules()
    graph = {name: imports_of(path, modules) for name, path in modules.items()}
    assert "studio.engine.plan" in graph["studio.engine.stream"]  # the walk sees the package's imports
    assert find_cycle(graph) is None


def test_the_package_never_imports_the_app():
    modules = local_modules()
    for name, path in modules.items():
        if name.startswith("studio"):
            assert "app" not in imports_of(path, modules), name


def test_the_planner_and_the_torch_free_modules_import_no_torch():
    torch_free = ["studio.engine.plan", "studio.modes", "studio.params", "studio.images", "studio.exports",
                  "studio.runs", "studio.stack", "studio.scores", "studio.serving", "studio.errors"]
    code = ("import sys; sys.path.insert(0, 'src'); import importlib\n"
            f"for name in {torch_free!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_combine_tool_starts_without_torch():
    code = "import sys; sys.path.insert(0, 'src/tool'); import combine_layers; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("path, limit", [(SRC / "app.py", 2000),
                                         *((path, 700) for path in sorted((SRC / "studio").rglob("*.py")))],
                         ids=lambda value: str(value.relative_to(SRC)) if isinstance(value, Path) else None)
def test_each_file_reads_in_one_sitting(path, limit):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= limit


def test_app_keeps_the_seeds_flow_in_order():
    text = (SRC / "app.py").read_text(encoding="utf-8")
    sections = ["# 1. Flags", "# 2. Environment", "# 3. Loading", "# 4. Infer", "# 5. Exports", "# 6. UI", "# 7. main"]
    positions = [text.index(section) for section in sections]
    assert positions == sorted(positions)
    # What each section owns is defined in it, before the next one begins.
    for name, section in [("def load_pipeline", 2), ("def apply_memory_optimizations", 2), ("def infer", 3),
                          ("def build_ui", 5), ("def main", 6)]:
        assert positions[section] < text.index(name) < (positions + [len(text)])[section + 1], name
