"""The layout shows the architecture (docs/architecture.md): floors that import only downwards, no
import circle, imports at the top, one module per idea of bounded length, no long functions, and the
bag rule and the training loop each defined once."""

import ast
import collections
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "reidkit"


def _functions():
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def _code_lines(fn) -> int:
    """Lines of a function without its docstring."""
    body = fn.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        start = body[1].lineno if len(body) > 1 else fn.end_lineno + 1
    else:
        start = first.lineno
    return fn.end_lineno - start + 1


def test_no_function_is_longer_than_80_lines_of_code():
    long = [f"{p.relative_to(PKG.parent)}:{fn.lineno} {fn.name} ({_code_lines(fn)} lines)"
            for p, fn in _functions() if _code_lines(fn) > 80]
    assert not long, "functions over 80 lines of code: " + ", ".join(long)


def _epoch_loops(tree) -> list:
    """``for ... in range(..., <x>.epochs)`` loops: a loop over the epochs of a run."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.For)
            and isinstance(n.iter, ast.Call) and getattr(n.iter.func, "id", "") == "range"
            and any(isinstance(a, ast.Attribute) and a.attr == "epochs" for a in ast.walk(n.iter))]


def test_one_training_loop_for_both_methods():
    """The epoch loop lives in the engine; the methods only set an epoch up and take a step."""
    for name in ("hhcl/method.py", "dgl/method.py"):
        assert not _epoch_loops(ast.parse((PKG / name).read_text())), f"{name} loops over epochs itself"
    owners = [p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if _epoch_loops(ast.parse(p.read_text()))]
    assert owners == ["train/engine.py"]


#: the floors of docs/architecture.md: a module imports only from its own floor or below
FLOORS = {"core": 0, "config": 0, "data": 1, "nets": 2, "retrieval": 2, "train": 4, "methods": 5, "course": 6, "viz": 6,
          "cli": 7, "commands": 7, "__main__": 7, "__init__": 0}
#: inside hhcl/ and dgl/, the kernels stand on floor 3 and the methods on floor 5
METHOD_MODULES = {"reidkit.hhcl.method": 5, "reidkit.hhcl.supervised": 5, "reidkit.dgl.method": 5,
                  "reidkit.dgl.evaluate": 5}
#: function-level imports allowed, each an optional or run-time-only dependency or a measured start-up
#: cost (see the architecture page)
OPTIONAL = {"faiss", "papermill", "traitlets", "jupyter_client", "nbclient", "IPython", "ipywidgets",
            "torchvision", "nbformat", "nbconvert", "mistune", "latex2mathml"}
#: run-time-only imports of the kit itself, by file: the command line parses its arguments before it
#: loads the commands (and PyTorch with them), so that ``--help`` answers at once
RUNTIME_ONLY = {("reidkit/cli.py", "reidkit.commands")}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _floor(mod: str) -> int:
    if mod in METHOD_MODULES:
        return METHOD_MODULES[mod]
    top = mod.split(".")[1] if "." in mod else "__init__"
    return 3 if top in ("hhcl", "dgl") else FLOORS[top]


def _kit_imports():
    """(importer, imported module, node, at top level) for every import of the kit by the kit."""
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("reidkit"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    yield mod, sub if sub in mods else node.module, node, node in tree.body
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("reidkit"):
                        yield mod, a.name, node, node in tree.body


def test_imports_point_only_downwards():
    up = [f"{a} (floor {_floor(a)}) imports {b} (floor {_floor(b)})"
          for a, b, _, _ in _kit_imports() if _floor(b) > _floor(a)]
    assert not up, "upward imports: " + "; ".join(up)


def test_no_import_circle():
    graph = collections.defaultdict(set)
    for a, b, _, _ in _kit_imports():
        graph[a].add(b)
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import circle: " + " -> ".join(stack + [node, nxt])
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in list(graph):
        if node not in state:
            visit(node, [])


def test_imports_are_at_the_top_unless_optional():
    hidden = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    full = f"{name}.{node.names[0].name}" if isinstance(node, ast.ImportFrom) else name
                    if name.split(".")[0] in OPTIONAL or (str(path.relative_to(PKG.parent)), full) in RUNTIME_ONLY:
                        continue
                    hidden.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {name}")
    assert not hidden, "function-level imports: " + ", ".join(hidden)


def test_no_module_is_over_600_lines():
    long = [f"{p.relative_to(PKG.parent)} ({n})" for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600]
    assert not long, "modules over 600 lines: " + ", ".join(long)


def test_the_sysu_bag_rule_is_defined_once():
    """Every user of SYSU-30k's consecutive-folder rule calls reidkit.data.sysu."""
    defs = [f"{p.name}:{fn.name}" for p, fn in _functions() if fn.name in ("bag_slots", "bag_members")]
    assert defs == ["sysu.py:bag_slots", "sysu.py:bag_members"]
