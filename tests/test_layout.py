"""Issue 10: the layout shows the architecture. One module per idea, no long functions, and the
bag rule and the training loop each defined once."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "reidkit"


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


def test_one_training_loop_for_both_methods():
    """The epoch loop lives in the engine; the methods only set an epoch up and take a step."""
    assert not (PKG / "train.py").exists() and not (PKG / "train_weak.py").exists()
    for name in ("hhcl.py", "dgl.py"):
        tree = ast.parse((PKG / name).read_text())
        loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)
                 and isinstance(n.iter, ast.Call) and getattr(n.iter.func, "id", "") == "range"
                 and any(isinstance(a, ast.Attribute) and a.attr == "epochs" for a in ast.walk(n.iter))]
        assert not loops, f"{name} loops over epochs itself"
    engine = (PKG / "engine.py").read_text()
    assert "for epoch in range(run.start_epoch, run.method.epochs)" in engine


def test_the_sysu_bag_rule_is_defined_once():
    """Every user of SYSU-30k's consecutive-folder rule calls reidkit.data.sysu."""
    defs = [f"{p.name}:{fn.name}" for p, fn in _functions() if fn.name in ("bag_slots", "bag_members")]
    assert defs == ["sysu.py:bag_slots", "sysu.py:bag_members"]
