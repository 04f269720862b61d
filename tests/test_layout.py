"""The package layout is the architecture: the algorithm imports nothing of the system, each
layer only the ones below it, and no module imports itself back through others."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "dreamer_fast"

# Which of the package's parts each part may import (config.py and checks.py are shared by all).
ALLOWED = {
    "checks": set(),  # the errors and value checks every part raises
    "config": {"checks"},
    "machine": {"config", "checks"},  # each "auto" the device decides, settled once
    "kernels": {"kernels"},  # kernels/ (installed as dreamer_fast.kernels) imports none of it
    "agent": {"config", "checks", "machine", "agent", "kernels"},
    "envs": {"config", "checks", "envs"},
    "data": {"config", "checks", "data", "envs.base", "envs.spaces"},
    "export": {"config", "checks", "flags", "data", "envs"},
    "run": {"config", "checks", "machine", "flags", "agent", "envs", "data", "run", "scores"},
    "scores": set(),  # IQM and bootstrap intervals across seeds (numpy only)
    "plot": {"scores"},  # reads run folders' files only
    "flags": {"config", "checks", "machine"},  # the command line's flags -> a Config
    "cli": {"config", "checks", "flags", "envs", "data", "export", "plot", "run"},  # the command line
}


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: pathlib.Path) -> set[str]:
    """dreamer_fast modules imported by a file, at run time (not under `if TYPE_CHECKING`)."""
    tree = ast.parse(path.read_text())
    found = set()

    def visit(node, typing_only=False):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only = True
        if not typing_only:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("dreamer_fast"))
            elif (isinstance(node, ast.ImportFrom)
                  and (node.module or "").startswith("dreamer_fast")):
                for a in node.names:  # `from dreamer_fast.run import checkpoint` is a module
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                              else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child, typing_only)

    visit(tree)
    return found


FILES = sorted({*PKG.rglob("*.py"), *(PKG / "kernels").glob("*.py")})


def test_kernels_is_the_top_level_folder_installed_in_the_package():
    """kernels/ is the layout's top-level folder; the package reaches it through a link, so
    it installs as dreamer_fast.kernels (never a bare `kernels`, another distribution's
    name), and nothing imports it by the bare name."""
    link = PKG / "kernels"
    assert link.is_symlink() and link.resolve() == (PKG.parent / "kernels").resolve()
    for path in [*PKG.parent.glob("*.py"), *PKG.rglob("*.py"),
                 *(PKG.parent / "tests").glob("*.py"), *(PKG.parent / "bench").glob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            assert not any(n == "kernels" or n.startswith("kernels.") for n in names), path


def part_of(name: str) -> str:
    return name.split(".")[1] if name.count(".") >= 1 else ""


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_layer_imports(path):
    me = module_name(path)
    part = part_of(me)
    if part == "":
        return  # the package docstring
    allowed = ALLOWED[part]
    for name in imports(path):
        rest = name.removeprefix("dreamer_fast.")
        assert any(rest == a or rest.startswith(a + ".") for a in allowed), (
            f"{me} imports {name}; {part}/ may import only {sorted(allowed)}")


def test_no_import_cycles():
    graph = {module_name(p): {m for m in imports(p) if m != module_name(p)} for p in FILES}
    state: dict[str, int] = {}

    def dfs(node, stack):  # state 1: on the current path, 2: done
        state[node] = 1
        for nxt in sorted(graph[node] & graph.keys()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):]
                                                                     + [nxt]))
            if nxt not in state:
                dfs(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [node])
