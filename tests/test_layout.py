"""The package layout keeps its promises: no import circles, no module reaching into another's
underscore names, the library never importing the daemon, and modules of a readable size; in
the daemon, no object reaching into another's underscore attributes.

Imports are read from the source (every ``import`` and ``from`` statement, those inside
functions and ``if TYPE_CHECKING:`` blocks included), so a circle hidden behind a late
import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tlog", "tlogserver")
#: Lines a module may have; above it, it should be split by concern...
MAX_LINES = 650
#: ...unless it is one concern, said here, within a looser bound.
ONE_CONCERN: dict[str, str] = {}
ONE_CONCERN_MAX_LINES = 750
#: The layers, bottom first: a module imports from its own layer or those below, never above.
LAYERS = (
    ("tlog.compiled", "tlog.units", "tlog.holes", "tlog.allocator", "tlog.configsource"),
    ("tlog.protocol", "tlog.storage"),
    ("tlog.record", "tlog.client"),
    ("tlog.read", "tlog.retention", "tlog.nbd"),
    ("tlog.cli", "tlogserver"),
)
#: The daemon's write path: a block from the socket to the storage, and its answers.
WRITE_PATH = ("tlogserver.connection", "tlogserver.vdisk", "tlogserver.flusher")

#: Packages where only ``self._x`` and ``cls._x`` are used: an object's underscore attributes
#: are its own (the wiring between objects goes through what they make public).
OWN_PRIVATES_ONLY = ("tlog", "tlogserver")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base.pop()  # a module's package
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import statement of ``module``."""
    path = MODULES[module]
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            names = [alias.name for alias in node.names]
            # "from package import module" imports the module
            subs = [n for n in names if f"{target}.{n}" in MODULES]
            out.extend((f"{target}.{n}", []) for n in subs)
            out.append((target, [n for n in names if n not in subs]))
    return [(t, names) for t, names in out if t.split(".")[0] in PACKAGES]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _names in _imports(module):
            # importing a.b.c runs a and a.b first; only an edge to the deepest known module
            # matters for circles between modules
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def test_no_import_circles() -> None:
    graph = _graph()
    # A package's __init__ re-exporting its modules is not a circle with them: drop the
    # edges from a module up to the package that contains it.
    for module, targets in graph.items():
        graph[module] = {t for t in targets
                         if not (_is_package(t) and module.startswith(t + "."))}
    assert _cycles(graph) == []


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = [f"{module} imports {name} from {target}"
                 for module in MODULES for target, names in _imports(module)
                 for name in names if name.startswith("_") and target != module]
    assert offenders == []


def test_the_library_never_imports_the_daemon() -> None:
    offenders = [f"{module} imports {target}" for module in MODULES if module.startswith("tlog.")
                 or module == "tlog" for target, _ in _imports(module)
                 if target.split(".")[0] == "tlogserver"]
    assert offenders == []


def test_modules_stay_readable_in_size() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    limits = {m: ONE_CONCERN_MAX_LINES if m in ONE_CONCERN else MAX_LINES for m in MODULES}
    assert {m: n for m, n in sizes.items() if n > limits[m]} == {}


def _layer(module: str) -> int | None:
    """The layer of ``module``; None for the root package ``tlog`` (its names load lazily)."""
    for level, packages in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in packages):
            return level
    return None


def test_the_layers_import_only_downwards() -> None:
    """Storage and protocol at the bottom, record and client above, read, retention and nbd
    above those, the cli and the daemon on top."""
    assert [m for m in MODULES if m != "tlog" and _layer(m) is None] == []
    offenders = []
    for module, targets in _graph().items():
        for target in sorted(targets):
            low, high = _layer(module), _layer(target)
            if low is not None and high is not None and high > low:
                offenders.append(f"{module} imports {target}")
    assert offenders == []


def test_the_daemons_write_path_imports_nothing_from_the_read_side() -> None:
    """A block on its way to the storage needs nothing of reading a log back: the storage
    layout is `tlog.storage.keys`', a record read back `tlog.record.pieces`'."""
    offenders = [f"{module} imports {target}" for module in WRITE_PATH
                 for target, _ in _imports(module)
                 if target == "tlog.read" or target.startswith("tlog.read.")]
    assert offenders == []

# The standard library's documented underscore names.
STDLIB_PRIVATES = {"os._exit"}


def _foreign_privates(tree: ast.AST) -> list[ast.Attribute]:
    """``x._name`` where x is not ``self`` or ``cls`` (dunder names aside). A module's own
    underscore names are plain names, not attributes, and pass."""
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_")
            and not (node.attr.startswith("__") and node.attr.endswith("__"))
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            and ast.unparse(node) not in STDLIB_PRIVATES]


def test_objects_use_only_their_own_underscore_attributes() -> None:
    offenders = [f"{module}:{node.lineno}: {ast.unparse(node)}"
                 for module, path in MODULES.items()
                 if module.split(".")[0] in OWN_PRIVATES_ONLY
                 for node in _foreign_privates(ast.parse(path.read_text(), str(path)))]
    assert offenders == []


def test_the_checker_sees_foreign_underscore_attributes() -> None:
    source = ("_COUNT = 0\n"
              "class A:\n"
              "    def f(self, other):\n"
              "        self._a = other._b + _COUNT\n"
              "        return cls._c, other.public, other.__class__, self.peer._d, os._exit\n")
    assert [ast.unparse(n) for n in _foreign_privates(ast.parse(source))] == [
        "other._b", "self.peer._d"]


def test_the_checker_sees_circles() -> None:
    """The circle finder itself: a graph with a loop is reported, one without is not."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
