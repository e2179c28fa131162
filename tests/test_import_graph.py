"""The library's layering, read from the source (#25): every ``import`` of every module, function-local ones included.

- the import graph inside ``reflowpairs/`` is acyclic;
- ``cli/`` imports only the library (and the CLI toolkit: typer, click, rich), and the library never imports the CLI
  or its toolkit;
- library modules import each other at the top of the module, never inside a function;
- the only function-local imports in the library are of third-party packages (heavy or optional: torch, lerobot,
  zarr, wandb ...), each with a comment on its line or the line above saying why; the CLI's are the ones that keep
  ``--help`` from importing torch and lerobot, each with its comment too.

Imports under ``if TYPE_CHECKING:`` are not executed and are left out.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "reflowpairs"
CLI_TOOLKIT = {"typer", "click", "rich"}


@dataclass(frozen=True)
class Import:
    """One import statement: the module it names (absolute), the module it is in, where, and whether it is inside a
    function."""

    target: str
    names: tuple[str, ...]
    source: str
    line: int
    local: bool
    commented: bool


def module_name(path: Path) -> str:
    """``reflowpairs/store/reader.py`` -> ``reflowpairs.store.reader``; ``cli/app.py`` -> ``cli.app``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(path: Path) -> list[Import]:
    """Every executed import statement in ``path``."""
    text = path.read_text()
    lines = text.splitlines()
    module = module_name(path)
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def commented(node: ast.stmt) -> bool:
        """A comment on the statement's own lines, or above it in its block of imports and comments."""
        if any("#" in lines[i - 1] for i in range(node.lineno, (node.end_lineno or node.lineno) + 1)):
            return True
        line = node.lineno - 1
        while line >= 1:
            text = lines[line - 1].strip()
            if text.startswith("#") or ("#" in text and text.startswith(("from ", "import "))):
                return True
            if not (text.startswith(("from ", "import ", ")")) or text.endswith(",")):
                return False
            line -= 1
        return False

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, local)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(alias.name, (), module, child.lineno, local, commented(child)))
            elif isinstance(child, ast.ImportFrom):
                target = _absolute(child, module, is_package)
                names = tuple(a.name for a in child.names)
                found.append(Import(target, names, module, child.lineno, local, commented(child)))
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(ast.parse(text, str(path)), local=False)
    return found


def all_imports(package: str) -> dict[str, list[Import]]:
    return {module_name(p): imports_of(p) for p in source_files(package)}


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def library_edges(modules: dict[str, list[Import]]) -> dict[str, set[str]]:
    """Module -> library modules it imports. ``from P import name`` counts as importing ``P.name`` when that is a
    module, else ``P``; importing a module outside one's own package also runs its packages' ``__init__``. The root
    package ``reflowpairs`` (version only) is left out."""
    known = set(modules)
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for source, found in modules.items():
        own = _ancestors(source) | {source}
        for imp in found:
            if imp.target != LIBRARY and not imp.target.startswith(LIBRARY + "."):
                continue
            targets = {f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in known}
            if not targets or len(targets) < len(imp.names):
                targets.add(imp.target)
            for target in list(targets):
                targets |= {a for a in _ancestors(target) if a in known and a not in own}
            edges[source] |= {t for t in targets if t in known and t != LIBRARY and t != source}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``edges`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _top(name: str) -> str:
    return name.split(".")[0]


def _third_party(name: str) -> bool:
    return _top(name) not in sys.stdlib_module_names and _top(name) not in {LIBRARY, "cli", "__future__"}


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_library_import_graph_is_acyclic():
    modules = all_imports(LIBRARY)
    assert len(modules) > 20, "the checker found too few modules to be reading the library"
    edges = library_edges(modules)
    assert sum(map(len, edges.values())) > 30
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_modules_import_each_other_at_the_top():
    late = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for found in all_imports(LIBRARY).values()
        for imp in found
        if imp.local and _top(imp.target) == LIBRARY
    ]
    assert not late, "library imports inside functions (move them to the top):\n" + "\n".join(late)


def test_lazy_imports_are_third_party_and_say_why():
    bad = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        + (
            " (not third-party: import it at the top)"
            if not _third_party(imp.target)
            else " (no comment saying why)"
        )
        for found in all_imports(LIBRARY).values()
        for imp in found
        if imp.local and (not _third_party(imp.target) or not imp.commented)
    ]
    assert not bad, "function-local imports:\n" + "\n".join(bad)


def test_the_cli_defers_only_heavy_imports_and_says_why():
    """The commands import the library inside a command when that keeps ``--help`` free of torch and lerobot; each
    such import says so."""
    bad = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for found in all_imports("cli").values()
        for imp in found
        if imp.local and not imp.commented
    ]
    assert not bad, "function-local imports in the CLI without a comment saying why:\n" + "\n".join(bad)


def test_the_library_does_not_import_the_cli_or_its_toolkit():
    """Except ``python -m reflowpairs`` (``__main__.py``: two lines that start the CLI)."""
    bad = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for source, found in all_imports(LIBRARY).items()
        for imp in found
        if (_top(imp.target) in CLI_TOOLKIT | {"cli"} or imp.target.startswith("reflowpairs.cli"))
        and source != "reflowpairs.__main__"
    ]
    assert not bad, "\n".join(bad)


def test_the_cli_imports_only_the_library_and_its_toolkit():
    bad = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for found in all_imports("cli").values()
        for imp in found
        if _third_party(imp.target) and _top(imp.target) not in CLI_TOOLKIT
    ]
    assert not bad, "the CLI reaches past the library:\n" + "\n".join(bad)
