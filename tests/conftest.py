"""Shared pytest setup.

``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is decorated, so it must be set here,
before any test module imports ``kernels``: that is what lets the kernel tests run the Triton
kernels on CPU tensors. The interpreter is far too slow for model tests, though, so every test
outside the ``test_kernels*`` modules runs inside ``kernels.force_reference()`` (torch path).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere, installed or not
    sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_kernels_outside_kernel_tests(request):
    module = getattr(request.node, "module", None)
    name = module.__name__.rsplit(".", 1)[-1] if module is not None else ""
    if name.startswith("test_kernels"):
        yield
    else:
        with kernels.force_reference():
            yield


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The shared data folder next to the repository (``../shared/data``); skips when absent."""
    path = ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is absent: real-data test skipped")
    return path

