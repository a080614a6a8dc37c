"""GPU-only tests: every test here is skipped, with the reason, where no CUDA GPU is visible (CI, CPU machines)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(skip)


from tests.pipeline.conftest import project  # noqa: E402, F401  (a fresh copy of the project, for pipeline runs)
