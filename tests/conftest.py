from __future__ import annotations

import pytest
import torch
from tiny import build_tiny_teacher


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Path of a tiny untrained class-conditional teacher folder (see tests/tiny.py)."""
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture(scope="module")
def one_thread():
    """Run torch on one thread for a module: the tiny models are faster so, and many times faster when other jobs
    share the cores (restored afterwards, so other test modules keep their threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def f64():
    """float64 as torch's default dtype for one test (closed-form checks), restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
