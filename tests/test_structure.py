"""The package's shape: no import circle, the library never imports the CLI, no function too long
to hold in mind. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "loda_cli"
ROOT = "loda_cli"
# What the package's __init__ hands out lazily (PEP 562), and where it comes from.
FACADE = {"Scorer": "loda_cli.scoring", "score_paths": "loda_cli.scoring", "load_model": "loda_cli.weights"}
MAX_BODY_LINES = 100


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(tree: ast.AST) -> set[str]:
    """Every loda_cli module this tree imports, at the top or inside a function.

    ``loda_cli`` itself is the facade: it defines ``__version__`` before importing anything, so
    ``from loda_cli import __version__`` is no edge, and a facade name is an edge to the module
    that defines it. The facade's own lazy imports are left out for the same reason.
    """
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(ROOT + "."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module != ROOT and not node.module.startswith(ROOT + "."):
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in MODULES:
                    found.add(full)
                elif node.module == ROOT:
                    if alias.name in FACADE:
                        found.add(FACADE[alias.name])
                else:
                    found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError("loda_cli uses absolute imports only")
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        edges = set() if name == ROOT else _imports(ast.parse(path.read_text(encoding="utf-8")))
        graph[name] = {edge for edge in edges if edge != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_is_read():
    graph = _graph()
    assert "loda_cli.errors" in graph["loda_cli.weights"]
    assert "loda_cli.home" in graph["loda_cli.precision"]  # a function-level import counts
    assert "loda_cli.scoring" in graph["loda_cli.cli.score"]


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_the_cli():
    cli = ROOT + ".cli"
    for name, targets in _graph().items():
        if name == cli or name.startswith(cli + ".") or name == ROOT + ".__main__":
            continue
        assert not [t for t in targets if t == cli or t.startswith(cli + ".")], name


def test_home_and_weights_depend_downward():
    graph = _graph()
    assert graph["loda_cli.home"] <= {"loda_cli.errors"}
    assert graph["loda_cli.atomic"] == set()
    below_weights = {"loda_cli.errors", "loda_cli.home", "loda_cli.config", "loda_cli.metrics", "loda_cli.atomic"}
    below_weights |= {"loda_cli.model", "loda_cli.baselines"}
    datasets = {name for name in MODULES if name.split(".")[:2] == ["loda_cli", "datasets"]}
    assert graph["loda_cli.weights"] <= below_weights | datasets
    for name in datasets | {"loda_cli.baselines", "loda_cli.model"}:
        assert "loda_cli.weights" not in graph[name], name



def _body_lengths() -> dict[str, int]:
    """Lines from a function's first statement (its docstring included) to its end, so a Typer
    command's long signature does not count; a nested function counts inside its parent too."""
    lengths = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{name}.{node.name}:{node.lineno}"] = node.end_lineno - node.body[0].lineno + 1
    return lengths


def test_no_function_is_too_long_to_hold_in_mind():
    lengths = _body_lengths()
    assert lengths["loda_cli.train.train:" + str(_line_of("loda_cli.train", "train"))] < 30
    assert {name: n for name, n in lengths.items() if n > MAX_BODY_LINES} == {}


def _line_of(module: str, function: str) -> int:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    return next(n.lineno for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)

# --- where files are moved, linked, renamed or removed ------------------------------------------

_OS_CALLS = {"unlink", "remove", "rename", "renames", "replace", "link", "symlink", "rmdir", "removedirs"}
_SHUTIL_CALLS = {"move", "rmtree", "copy", "copy2", "copyfile", "copytree"}
_PATH_METHODS = {"unlink", "rename", "rmdir", "symlink_to", "hardlink_to"}  # no str method has these

# Every such call in the package, by (file, function). The photos themselves are only ever touched
# in organize/fileops.py (README, "Guarantees": nothing is deleted, every move is journalled);
# everywhere else loda renames its own temporary file into place, or removes its own file.
PHOTO_SITES = {
    ("organize/fileops.py", "place"): {"os.link", "os.unlink"},
    ("organize/fileops.py", "copy_verified"): {"os.unlink"},
    ("organize/fileops.py", "move"): {"os.link", "os.unlink"},
    # Without hard links: the C library's rename that refuses an existing name (renameat2,
    # renamex_np, through ctypes; see test_only_fileops_renames_through_the_c_library), else this.
    ("organize/fileops.py", "rename_new"): {"os.rename"},
    ("organize/fileops.py", "drop"): {"os.unlink"},  # PendingDrops: a moved photo's old name
    ("organize/fileops.py", "_new_file"): {"os.unlink"},
    ("organize/fileops.py", "write_file"): {"os.replace"},
    ("organize/fileops.py", "symlink"): {"os.symlink"},
    ("organize/fileops.py", "remove"): {"os.unlink"},
    ("organize/fileops.py", "remove_tmp"): {"os.unlink"},
    ("organize/fileops.py", "remove_empty_folder"): {"os.rmdir"},
}
OWN_FILE_SITES = {  # a temporary file renamed into place (and removed when writing it failed)
    ("atomic.py", "replacing"): {"os.replace", ".unlink"},  # what the other writers use
    ("output.py", "atomic_write_text"): {"os.replace", ".unlink"},
    ("builtin.py", "train_builtin"): {".unlink"},  # the finished run's resume state
    ("precision.py", "_write_entry"): {"os.replace", "os.unlink"},
    ("benchmark_speed.py", "make_synthetic_jpegs"): {"shutil.copyfile"},
    ("datasets/prepare.py", "_prepare_one"): {"os.replace", "os.unlink"},
    ("cache.py", "set_aside_if_damaged"): {"os.replace"},  # a damaged score cache, renamed aside
}
# loda data download works only inside the `<dest>.part` folder it made and marked (a folder of that
# name it did not make is refused), and puts the finished dataset in place by one rename into a new
# or empty destination.
DOWNLOAD_SITES = {
    ("download.py", "_download_once"): {".unlink"},  # a partial archive that cannot be resumed
    ("download.py", "_tidy_part"): {"shutil.rmtree"},
    ("download.py", "_unpack_all"): {"shutil.rmtree"},
    ("download.py", "fetch"): {"shutil.rmtree"},  # the .part folder, once the dataset is in place
    ("unpack.py", "discard"): {".unlink"},
    ("unpack.py", "into_place"): {"os.rename", ".rmdir"},
    ("unpack.py", "merge"): {"os.rename"},
}


class _FileOperations(ast.NodeVisitor):
    """Collects the calls above, each under the innermost function that makes it."""

    def __init__(self, relative: str, found: dict[tuple[str, str], set[str]]):
        self.relative, self.found, self.functions = relative, found, ["<module>"]

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            attr = node.func.attr
            call = None
            if owner == "os" and attr in _OS_CALLS:
                call = f"os.{attr}"
            elif owner == "shutil" and attr in _SHUTIL_CALLS:
                call = f"shutil.{attr}"
            elif owner not in ("os", "shutil") and attr in _PATH_METHODS:
                call = f".{attr}"
            if call:
                self.found.setdefault((self.relative, self.functions[-1]), set()).add(call)
        self.generic_visit(node)


def _file_operation_sites() -> dict[tuple[str, str], set[str]]:
    found: dict[tuple[str, str], set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        _FileOperations(relative, found).visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_files_are_moved_linked_and_removed_only_at_the_known_sites():
    assert _file_operation_sites() == {**PHOTO_SITES, **OWN_FILE_SITES, **DOWNLOAD_SITES}


def test_only_fileops_renames_through_the_c_library():
    users = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
             if any(name in path.read_text(encoding="utf-8") for name in ("renameat2", "renamex_np", "ctypes.CDLL"))}
    # The others: glibc's mallopt (allocator.py) and prctl (scoring.py's workers); no files.
    assert users == {"organize/fileops.py", "allocator.py", "scoring.py"}


def test_the_organize_commands_touch_files_only_through_fileops():
    sites = _file_operation_sites()
    organize = {site for site in sites if site[0].startswith("organize/")}
    assert organize and all(file == "organize/fileops.py" for file, _ in organize)
