"""Shared fixtures: the bundled diffusers fixtures and their golden outputs, MindSpore context."""

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


@pytest.fixture(scope="session")
def svd_tiny():
    return FIXTURES / "svd-tiny" / "pipeline"


@pytest.fixture(scope="session")
def svd_golden():
    return dict(np.load(FIXTURES / "svd-tiny" / "golden.npz"))


@pytest.fixture(scope="session")
def svd_golden_call():
    with open(FIXTURES / "svd-tiny" / "golden.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def t2v_tiny():
    return FIXTURES / "t2v-tiny" / "pipeline"


@pytest.fixture(scope="session")
def t2v_golden():
    return dict(np.load(FIXTURES / "t2v-tiny" / "golden.npz"))


@pytest.fixture(scope="session")
def ms():
    """MindSpore in GRAPH_MODE on CPU (the mode that export compiles); skips where it is not installed."""
    mindspore = pytest.importorskip("mindspore", reason="needs MindSpore: pip install -e '.[export]'")
    mindspore.set_context(mode=mindspore.GRAPH_MODE, device_target="CPU")
    return mindspore
