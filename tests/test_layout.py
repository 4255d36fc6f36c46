"""The package's layout by layer (issue 30; ``docs/architecture.md``): no import cycle between its
modules, each layer importing only the layers below it, and no module of the packages, of the
studies' ``examples/study`` or of the tests over about 400 lines.

Read from the source (``ast``), not by importing: module-level imports only (an import inside a
function runs late and may point up, as the backends' lazy loads do)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"oplora": ROOT / "python", "oplora_kernels": ROOT / "oplora_kernels"}
MAX_LINES = 420  # "about 400"
#: The layers, lowest first: a module may import its own layer and the layers before it.
LAYERS = [
    ("base", ("oplora._checks", "oplora._dtensor", "oplora.reference", "oplora.lorsum", "oplora.layers",
              "oplora._cpu")),
    ("backends", ("oplora.backends", "oplora_kernels")),
    ("capture", ("oplora.capture", "oplora.memory_model")),
    ("optim", ("oplora.optim", "oplora.factory", "oplora")),
    ("bench", ("oplora.bench",)),
]


def modules():
    """``{dotted name: path}`` of every module of the two packages (``__init__`` as the package)."""
    out = {}
    for top, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([top] + parts)] = path
    return out


def imports(name, path, known):
    """The package modules ``name`` imports at module level (``from . import x`` counts as the
    module ``x`` when there is one, else as the package)."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer_of(name):
    for index, (_, prefixes) in reversed(list(enumerate(LAYERS))):
        if any(name == p or name.startswith(p + ".") for p in prefixes if p != "oplora"):
            return index
    return [i for i, (_, prefixes) in enumerate(LAYERS) if "oplora" in prefixes][0]


def test_the_graph_is_read():
    edges = graph()
    assert "oplora.capture" in edges["oplora.optim.base"]
    assert "oplora.capture.rows" in edges["oplora.capture.holding"]
    assert "oplora.backends" in edges["oplora.capture.capture"]
    assert "oplora.reference" in edges["oplora.backends.ops"]


def test_no_import_cycle():
    edges = graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            # a submodule importing its own package's __init__ while that __init__ imports it is
            # Python's normal package initialisation, not a cycle of the code
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_each_layer_imports_only_the_layers_below():
    bad = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
           for name, deps in graph().items() for dep in deps
           if layer_of(dep) > layer_of(name) and not name.startswith(dep + ".")]
    assert not bad, "\n".join(bad)


def test_no_module_over_about_400_lines():
    paths = list(modules().values()) + list((ROOT / "examples" / "study").rglob("*.py")) + list(
        (ROOT / "tests").rglob("*.py"))
    long = {str(p.relative_to(ROOT)): n for p in paths if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
