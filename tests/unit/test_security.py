"""Nothing executes code from an artifact: a static check of the code, and a booby-trapped model file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from semiprune_core.errors import DataError
from semiprune_core.models.saved import load_model

ROOT = Path(__file__).resolve().parents[2]
CODE = sorted(p for d in ("flows", "tasks", "semiprune_core") for p in (ROOT / d).rglob("*.py"))
# the one reader of pickles, restricted to numpy arrays and plain containers (CIFAR's format)
RESTRICTED_UNPICKLER = ROOT / "semiprune_core/data/safe_pickle.py"


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if isinstance(func, ast.Attribute):  # x.eval() is a method, not the builtin
                name = f"{func.value.id if isinstance(func.value, ast.Name) else '<expr>'}.{name}"
            yield name, {k.arg: k.value for k in node.keywords}, node.lineno


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_the_code_never_loads_executable_content():
    assert len(CODE) > 40
    found = []
    for path in CODE:
        where = path.relative_to(ROOT)
        for name, kw, line in calls(path):
            if name == "torch.load" and not is_true(kw.get("weights_only")):
                found.append(f"{where}:{line} torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "marshal.loads", "yaml.unsafe_load", "os.system", "eval", "exec"):
                found.append(f"{where}:{line} {name}")
            if name == "yaml.load" and "Loader" not in kw:
                found.append(f"{where}:{line} yaml.load without a safe Loader")
            if name in ("np.load", "numpy.load") and is_true(kw.get("allow_pickle")):
                found.append(f"{where}:{line} np.load with allow_pickle=True")
            if is_true(kw.get("shell")):
                found.append(f"{where}:{line} a subprocess through the shell")
        if path != RESTRICTED_UNPICKLER and "Unpickler" in path.read_text():
            found.append(f"{where}: an unpickler outside {RESTRICTED_UNPICKLER.name}")
    assert not found, "\n".join(found)


def test_a_model_file_that_asks_to_run_code_is_refused_and_nothing_runs(tmp_path):
    proof = tmp_path / "ran"

    class Trap:
        def __reduce__(self):
            return (Path.touch, (proof,))

    path = tmp_path / "model.pt"
    torch.save({"format": 1, "spec": Trap(), "state_dict": {}}, path)  # a full pickle, not weights only
    with pytest.raises(DataError, match="is not a usable semiprune model"):
        load_model(path)
    assert not proof.exists()
