"""The layout's rules (docs/ARCHITECTURE.md), read from the source with `ast` (nothing is imported):
no import cycle among our modules, imports inside functions counted; the rooms of pipeline/ import one
way; no sys.path edits (the project is installed); no module over 500 lines; nobody imports the
top-level name `datasets` (Hugging Face's; ours is `ssal_datasets`). Each failure names file and line."""
from __future__ import annotations

import ast
import functools
import gc
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package name it is imported as (pyproject.toml's package-dir)
PACKAGES = {"pipeline": "pipeline", "ssal_models": "ssal_models", "datasets": "ssal_datasets"}
MAX_LINES = 500
#: the users' script paths into the launchers (thin shims that call a launcher's main)
LAUNCH_SHIMS = {"pipeline/launch.py", "pipeline/study.py"}
#: (room or library, what it must not import): launch, stages -> train -> tracking, never upwards; launch and
#: stages not each other; nothing imports launch (below); the two libraries import nothing of the pipeline nor
#: each other; tracking of the libraries only ssal_datasets.files
FORBIDDEN = [
    ("pipeline.tracking", ("pipeline.train", "pipeline.launch", "pipeline.stages", "ssal_models",
                           "ssal_datasets.loader", "ssal_datasets.writer", "ssal_datasets.manifest")),
    ("pipeline.launch", ("pipeline.stages",)),
    ("pipeline.train", ("pipeline.launch", "pipeline.stages")),
    ("pipeline.stages", ("pipeline.launch",)),
    ("ssal_models", ("pipeline", "ssal_datasets")),
    ("ssal_datasets", ("pipeline", "ssal_models")),
]
SYS_PATH_EDIT_IN_TEXT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|(\[[^\]]*\])?\s*\+?=(?!=))")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    """The dotted name; a script beside a package of its name (the shim pipeline/launch.py beside
    pipeline/launch/) cannot be imported and gets the name `pipeline.launch (script)`."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    shadowed = (path.with_suffix("") / "__init__.py").is_file()
    return ".".join(parts) + (" (script)" if shadowed else "")


def project_files() -> dict[str, Path]:
    """Every module of the three packages, by the name it is imported as."""
    return {module_name(p): p for folder in PACKAGES for p in sorted((ROOT / folder).rglob("*.py"))}


MODULES = project_files()


@functools.cache
def parse(path: Path) -> ast.Module:
    """The file's syntax tree, parsed once. CPython 3.11 keeps the AST builder's recursion counter in state
    shared by every parse (gh-106905): a parse by another thread, or by a finalizer the garbage collector runs
    mid-parse, breaks ours with a spurious "SystemError: AST constructor recursion depth mismatch" (seen once
    in CI). So no collection while we parse, and that one error gets a second parse (each parse resets the
    counter); any other error, a SyntaxError above all, fails the test as it should."""
    source = path.read_text()
    try:
        return parse_without_collection(source, path)
    except SystemError as error:
        if "recursion depth mismatch" not in str(error):
            raise
        return parse_without_collection(source, path)


def parse_without_collection(source: str, path: Path) -> ast.Module:
    collecting = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source, filename=str(path))
    finally:
        if collecting:
            gc.enable()


def python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def imported_modules(path: Path, name: str) -> list[tuple[str, int]]:
    """(module, line) for every import statement in the file, at any depth (functions included).
    `from pkg import x` counts as importing the submodule pkg.x when there is one, else pkg;
    relative imports are resolved against the file's package."""
    package = name if path.name == "__init__.py" else name.removesuffix(" (script)").rpartition(".")[0]
    found = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    return found


def project_imports(path: Path, name: str) -> list[tuple[str, int]]:
    """The imports of our own modules (longest known prefix of what is imported)."""
    edges = []
    for target, line in imported_modules(path, name):
        parts = target.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in MODULES:
                edges.append((".".join(parts[:end]), line))
                break
    return edges


GRAPH = {name: project_imports(path, name) for name, path in MODULES.items()}


def strongly_connected(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the groups of modules that import each other in a ring."""
    index, low, on_stack, stack, groups, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter[0]; counter[0] += 1
        stack.append(start); on_stack.add(start)
        while work:
            node, edges = work[-1]
            for target, _ in edges:
                if target not in index:
                    index[target] = low[target] = counter[0]; counter[0] += 1
                    stack.append(target); on_stack.add(target)
                    work.append((target, iter(graph[target])))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop(); on_stack.discard(member); group.append(member)
                        if member == node:
                            break
                    if len(group) > 1 or any(t == node for t, _ in graph[node]):
                        groups.append(sorted(group))
    return groups


def test_the_scan_sees_the_packages_and_their_imports():
    """The checks below read something: the rooms and libraries are there and import each other."""
    for name in ("pipeline.train.engine", "pipeline.launch.cli", "pipeline.tracking.tracker", "pipeline.stages.groups",
                 "ssal_models.base", "ssal_datasets.loader"):
        assert name in MODULES, f"{name} not found under {ROOT}: update tests/test_architecture.py to the layout"
    assert any(t.startswith("ssal_models") for t, _ in GRAPH["pipeline.train.factory"])
    assert any(t.startswith("ssal_datasets") for name in MODULES if name.startswith("pipeline.train")
               for t, _ in GRAPH[name])


def test_no_import_cycle_among_the_projects_modules():
    problems = []
    for group in strongly_connected(GRAPH):
        members = set(group)
        edges = [f"{rel(MODULES[name])}:{line} imports {target}"
                 for name in group for target, line in sorted(GRAPH[name], key=lambda edge: edge[1])
                 if target in members]
        problems.append("import cycle among " + ", ".join(group) + ":\n    " + "\n    ".join(edges))
    assert not problems, "\n".join(problems)


def test_the_cycle_search_finds_rings_and_only_them():
    graph = {"a": [("b", 1)], "b": [("c", 2)], "c": [("a", 3), ("d", 4)], "d": [], "e": [("e", 5)], "f": [("d", 6)]}
    assert sorted(strongly_connected(graph)) == [["a", "b", "c"], ["e"]]


def test_the_rooms_import_one_way():
    """docs/ARCHITECTURE.md: stages -> train, tracking; launch -> train, tracking; train -> tracking;
    tracking -> nothing of the pipeline; launch and stages not each other; nothing imports launch;
    ssal_models is pure model code."""
    def within(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    problems = []
    for name, path in MODULES.items():
        for target, line in GRAPH[name]:
            if within(target, "pipeline.launch") and not within(name, "pipeline.launch") \
                    and rel(path) not in LAUNCH_SHIMS:
                problems.append(f"{rel(path)}:{line}: imports {target}; nothing imports the launchers "
                                f"(only the script shims {sorted(LAUNCH_SHIMS)})")
            for room, forbidden in FORBIDDEN:
                if within(name, room):
                    problems += [f"{rel(path)}:{line}: {room} imports {target}, which it must not ({bad})"
                                 for bad in forbidden if within(target, bad) and not within(bad, "pipeline.launch")]
    assert not problems, "\n".join(sorted(set(problems), key=lambda p: (p.split(":")[0], int(p.split(":")[1]))))


def sys_path_edits(path: Path) -> list[int]:
    """Lines that change sys.path: assignment, +=, insert/append/extend, also in code kept in strings
    (a script a test hands to a subprocess)."""
    lines = []
    tree = parse(path)

    def is_sys_path(node) -> bool:
        while isinstance(node, ast.Subscript):
            node = node.value
        return isinstance(node, ast.Attribute) and node.attr == "path" \
            and isinstance(node.value, ast.Name) and node.value.id == "sys"

    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            lines += [node.lineno for t in targets if is_sys_path(t)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("insert", "append", "extend") and is_sys_path(node.func.value):
            lines.append(node.lineno)
        elif isinstance(node, (ast.Constant, ast.JoinedStr)):
            text = node.value if isinstance(node, ast.Constant) else "".join(
                v.value for v in node.values if isinstance(v, ast.Constant))
            if isinstance(text, str) and SYS_PATH_EDIT_IN_TEXT.search(text):
                first = text[: SYS_PATH_EDIT_IN_TEXT.search(text).start()]
                lines.append(node.lineno + first.count("\n"))
    return sorted(set(lines))


@pytest.mark.parametrize("room", ["train", "launch", "tracking", "stages"])
def test_each_rooms_docstring_names_all_its_modules(room):
    """docs/ARCHITECTURE.md: a room's __init__.py says what lives there; a module it does not name is one a
    reader of the docstring would not know of."""
    folder = ROOT / "pipeline" / room
    docstring = ast.get_docstring(parse(folder / "__init__.py")) or ""
    modules = [p.stem for p in sorted(folder.glob("*.py")) if p.stem not in ("__init__", "__main__")]
    assert modules, f"no modules in {rel(folder)}"
    missing = [m for m in modules if not re.search(rf"``{m}(``|\.)", docstring)]
    assert not missing, f"{rel(folder / '__init__.py')}: the docstring does not name {missing} (as ``name``)"


def test_no_sys_path_edits_the_package_is_installed():
    problems = [f"{rel(path)}:{line}: edits sys.path; the project is installed (`pip install -e .`, see README)"
                for path in python_files("pipeline", "ssal_models", "datasets", "bench", "tests")
                for line in sys_path_edits(path)]
    assert not problems, "\n".join(problems)


def test_the_sys_path_check_sees_edits_in_code_and_in_scripts_in_strings(tmp_path):
    sample = tmp_path / "sample.py"
    edit = "sys" + ".path"  # spelled apart, so that this file does not trip the check itself
    sample.write_text(f"import sys\n{edit}.insert(0, 'x')\n{edit}[:] = []\n{edit} += ['y']\n"
                      f"print({edit} == [])\nscript = f'''\nimport sys\n{edit}.append({{0!r}})\n'''\n")
    assert sys_path_edits(sample) == [2, 3, 4, 8]


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_no_module_over_500_lines(folder):
    problems = []
    for path in python_files(folder):
        count = len(path.read_text().splitlines())
        if count > MAX_LINES:
            problems.append(f"{rel(path)}:{MAX_LINES + 1}: {count} lines, over {MAX_LINES}: "
                            "split it by what its parts do")
    assert not problems, "\n".join(problems)


def test_nothing_imports_the_top_level_name_datasets():
    """`datasets` is Hugging Face's library; our datasets/ folder is the package `ssal_datasets`."""
    problems = []
    for path in python_files("pipeline", "ssal_models", "datasets", "bench", "tests"):
        parts = path.relative_to(ROOT).parts
        name = module_name(path) if parts[0] in PACKAGES else ".".join(parts).removesuffix(".py")
        problems += [f"{rel(path)}:{line}: imports {target}; the project's data package is ssal_datasets"
                     for target, line in imported_modules(path, name)
                     if target == "datasets" or target.startswith("datasets.")]
    assert not problems, "\n".join(problems)


class ParsesWhenFinalized:
    """Garbage whose finalizer parses, as a library's finalizer may: collected mid-parse, it resets the
    AST builder's shared counter under a plain ast.parse on CPython 3.11."""
    def __del__(self):
        ast.parse("def f():\n    return [[1]]\n")


def test_parse_survives_garbage_collected_mid_parse():
    path = ROOT / "pipeline" / "train" / "trainer.py"
    for _ in range(20):
        for _ in range(2000):
            cycle = ParsesWhenFinalized()
            cycle.me = cycle  # freed only by the collector
        parse.cache_clear()
        assert isinstance(parse(path), ast.Module)
    parse.cache_clear()
