"""The package's layout rules, read from its source with `ast` (no import runs), so a move that breaks one fails here.

Rules (docs/architecture.md explains the layout they keep):

- `config/schema.py` imports nothing of the package: the config is the leaf everything else reads.
- `training/` imports neither `ui/` nor IPython: the loop emits events, the UI subscribes.
- `ui/` never imports `training/` internals (it reads the events and the `Run`).
- No module imports another module's private (``_name``) name.
- No import circle among modules, except the ones named in `ALLOWED_CIRCLES` with the reason.

Run as a script for the layout figures quoted in the notes:  python tests/test_import_rules.py
"""

from __future__ import annotations

import ast
import pathlib
import sys

PACKAGE = "peft_magic"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE

# Import circles that are there on purpose (every module of a circle named, with the reason). All of them are closed
# by imports inside functions, so importing any one module never needs the others first.
ALLOWED_CIRCLES: dict[frozenset, str] = {
    frozenset(f"{PACKAGE}.{m}" for m in ("run", "session", "export.folder", "export.gguf_export")):
        "a `Run` is the notebook's handle: run.resume/evaluate/export forward to session and export/, which make "
        "(or load) Runs",
    frozenset(f"{PACKAGE}.{m}" for m in ("data.prepare", "data.cache", "data.preference")):
        "prepare dispatches tokenizing to the cache and dpo/orpo/grpo rows to preference.py; both reuse prepare's "
        "source helpers (resolve, tokenize, hold_out)",
    frozenset(f"{PACKAGE}.{m}" for m in ("methods", "methods.full", "preflight", "training.objectives")):
        "the memory pre-flight measures a method's adapter by building it through the registry on the meta device, "
        "and full fine-tuning estimates itself with the pre-flight's memory model",
}
# What config/schema.py may import: the errors and the objective sections, themselves leaves.
SCHEMA_MAY_IMPORT = {f"{PACKAGE}.errors", f"{PACKAGE}.config.objectives"}


def module_files() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk_imports(tree):
    """Every import statement, at any depth (imports inside functions count), except under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: pathlib.Path, modules) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for each thing `name` imports (package modules and others)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in _walk_imports(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in modules:  # `from . import models`: the module itself
                out.append((sub, None, node.lineno))
            else:
                out.append((base, alias.name, node.lineno))
    return out


def graph():
    """Module -> set of package modules it imports (a package's __init__ counts as the package)."""
    modules = module_files()
    edges = {}
    for name, path in modules.items():
        targets = set()
        for mod, _, _ in imports_of(name, path, modules):
            while mod and mod not in modules:  # `import peft_magic.x.y` of a non-module: its nearest module
                mod = mod.rpartition(".")[0]
            if mod and mod.startswith(PACKAGE) and mod != name:
                targets.add(mod)
        edges[name] = targets
    return edges


def circles(edges) -> list[frozenset]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def private_imports() -> list[str]:
    """`from peft_magic.x import _name` (another module's private name), and `module._name` on an imported
    package module, as 'importer:line -> module._name'."""
    modules = module_files()
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}  # local name -> package module bound to it
        for mod, what, line in imports_of(name, path, modules):
            if not mod.startswith(PACKAGE) or mod == name:
                continue
            if what is not None and what.startswith("_") and not what.startswith("__"):
                found.append(f"{name}:{line} -> {mod}.{what}")
        for node in _walk_imports(tree):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                resolved = [m for m, w, ln in imports_of(name, path, modules) if ln == node.lineno and w is None]
                if isinstance(node, ast.ImportFrom) and resolved:
                    for m in resolved:
                        if m.rpartition(".")[2] == alias.name:
                            aliases[local] = m
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):  # fmt: skip
                found.append(f"{name}:{node.lineno} -> {aliases[node.value.id]}.{node.attr}")
    return sorted(set(found))


def longest_functions(top=5) -> list[tuple[int, str]]:
    out = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(out, reverse=True)[:top]


# ---------------------------------------------------------------- the rules


def test_schema_imports_nothing_of_the_package():
    """The schema, and what it imports, import nothing of the package but `SCHEMA_MAY_IMPORT` (checks that need the
    method registry or training belong in config/checks.py)."""
    edges = graph()
    name = f"{PACKAGE}.config.schema"
    seen, todo = set(), [name]
    while todo:
        for target in edges[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    assert seen <= SCHEMA_MAY_IMPORT, f"config/schema.py must be a leaf; it reaches {sorted(seen - SCHEMA_MAY_IMPORT)}"


def test_training_imports_neither_ui_nor_ipython():
    modules = module_files()
    bad = [f"{name}:{ln} -> {m}" for name, path in modules.items() if name.startswith(f"{PACKAGE}.training")
           for m, _, ln in imports_of(name, path, modules)
           if m.startswith(f"{PACKAGE}.ui") or m.split(".")[0] in ("IPython", "ipywidgets")]  # fmt: skip
    assert not bad, f"training/ emits events and must not import the UI: {bad}"


def test_ui_does_not_import_training_internals():
    modules = module_files()
    bad = [f"{name}:{ln} -> {m}" for name, path in modules.items() if name.startswith(f"{PACKAGE}.ui")
           for m, _, ln in imports_of(name, path, modules) if m.startswith(f"{PACKAGE}.training")]  # fmt: skip
    assert not bad, f"ui/ subscribes to events and must not import training/: {bad}"


def test_no_module_imports_another_modules_private_name():
    found = private_imports()
    assert not found, "make what is shared public (or move it where it belongs):\n" + "\n".join(found)


def test_no_import_circles_but_the_named_ones():
    found = [c for c in circles(graph()) if c not in ALLOWED_CIRCLES]
    text = "\n".join(" <-> ".join(sorted(c)) for c in found)
    assert not found, f"import circles (break them, or name them in ALLOWED_CIRCLES with the reason):\n{text}"


def test_the_reader_sees_a_known_circle():
    """The checks above cannot pass by reading nothing: a planted circle and private import are found."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(edges) == [frozenset("abc")]
    assert set(ALLOWED_CIRCLES) <= set(circles(graph())), "an allowed circle that is gone: remove it from the list"
    modules = module_files()
    assert len(modules) > 50 and graph()[f"{PACKAGE}.api"], "the reader found the package and api's imports"


if __name__ == "__main__":
    edges = graph()
    found = circles(edges)
    print(f"modules: {len(edges)}")
    print(f"modules in import circles: {sum(len(c) for c in found)} in {len(found)} circle(s)")
    for c in found:
        print("   ", " ".join(sorted(m.removeprefix(PACKAGE + ".") for m in c)))
    priv = private_imports()
    print(f"imports of another module's private name: {len(priv)}")
    for p in priv:
        print("   ", p)
    print("longest functions:", ", ".join(f"{n} {name}" for n, name in longest_functions()))
