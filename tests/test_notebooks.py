"""The notebooks against the library's current API, without running them (a full run takes ~20 CPU minutes).

Each code cell must parse, every name it imports from diffjax or convert must exist, and every call of an
imported callable (`evaluate(...)`, `sampling.DDIMSampler(...)`, `convert.load(...)`) may only pass keyword
arguments that callable accepts: a renamed function or keyword fails here instead of in a user's notebook.
"""

import ast
import dataclasses
import importlib
import inspect
import json
import pathlib

import pytest

import diffjax
from diffjax.config import Config
from diffjax.evaluate import evaluate

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
OURS = ("diffjax", "convert")


def _config_fields(_: object) -> set[str]:
    return {f.name for f in dataclasses.fields(Config)}


# Callables whose **kwargs go somewhere known: the keywords they take, beyond their own.
FORWARDED = {
    evaluate: lambda _: set(inspect.signature(diffjax.generate).parameters),
    Config.demo: _config_fields,
    Config.tiny: _config_fields,
}


def code_of(path: pathlib.Path) -> ast.Module:
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    # IPython magics and shell lines are not Python.
    lines = [line for c in cells for line in "".join(c["source"]).splitlines() if not line.lstrip().startswith(("%", "!"))]
    return ast.parse("\n".join(lines), filename=path.name)


def imported_names(tree: ast.Module) -> dict[str, object]:
    """The notebook's bindings to our modules and their members: local name -> object."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OURS:
                    names[alias.asname or alias.name.split(".")[0]] = importlib.import_module(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    # `from package import submodule` binds a module the package has not imported itself.
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        pytest.fail(f"{node.module} has no {alias.name!r} (imported by the notebook)")
                names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


def resolve(func: ast.expr, names: dict[str, object]) -> object | None:
    """The object a call's `name` or `name.attr...` refers to, if it starts at one of our bindings."""
    if isinstance(func, ast.Name):
        return names.get(func.id)
    if isinstance(func, ast.Attribute):
        owner = resolve(func.value, names)
        if owner is None:
            return None
        if not hasattr(owner, func.attr):
            pytest.fail(f"{getattr(owner, '__name__', owner)} has no attribute {func.attr!r}")
        return getattr(owner, func.attr)
    return None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_calls_match_the_api(path):
    tree = code_of(path)
    names = imported_names(tree)
    checked = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = resolve(node.func, names)
        if target is None or not callable(target) or inspect.ismodule(target):
            continue
        params = inspect.signature(target).parameters
        accepted = set(params)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            if target not in FORWARDED:
                continue
            accepted |= FORWARDED[target](target)
        for keyword in node.keywords:
            if keyword.arg is not None:
                assert keyword.arg in accepted, (
                    f"line {node.lineno}: {ast.unparse(node.func)}() takes no keyword {keyword.arg!r}"
                )
        checked += 1
    assert checked >= 3, f"only {checked} calls of our API found: is the notebook parsed?"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_saved_executed_without_errors(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in cells), "a code cell was never run: re-execute the notebook"
    errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"saved error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"


def test_the_api_check_catches_a_renamed_keyword(tmp_path):
    notebook = {"cells": [{"cell_type": "code", "execution_count": 1, "outputs": [], "source": [
        "from diffjax.evaluate import evaluate\n", "from diffjax import sampling\n",
        "sampling.DDIMSampler(num_steps=4)\n", "sampling.NeverStop()\n", "evaluate(p, c, t, 4, key=k, max_denoising_steps=2)\n",
    ]}]}
    path = tmp_path / "renamed.ipynb"
    good = json.dumps(notebook)
    path.write_text(good)
    test_notebook_calls_match_the_api(path)
    for old, new, keyword in [("num_steps=4", "steps=4", "steps"), ("max_denoising_steps", "max_steps", "max_steps")]:
        path.write_text(good.replace(old, new))
        with pytest.raises(AssertionError, match=f"takes no keyword '{keyword}'"):
            test_notebook_calls_match_the_api(path)
