"""The top-level package: public names, lazy subpackages, and what importing costs."""

import subprocess
import sys

import pytest

import flatmin


@pytest.mark.parametrize("name", [n for n in flatmin.__all__ if n != "__version__"])
def test_public_name_is_the_class_of_that_name(name):
    obj = getattr(flatmin, name)
    assert isinstance(obj, type)
    assert obj.__name__ == name
    assert obj.__module__.startswith("flatmin.")
    assert obj.__doc__, f"flatmin.{name} has no docstring"


@pytest.mark.parametrize("name", ["data", "distributed", "measure", "optim", "trajectory"])
def test_subpackages_are_reachable_as_attributes(name):
    module = getattr(flatmin, name)
    assert module.__name__ == f"flatmin.{name}"
    assert name in dir(flatmin)


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'sam'"):
        flatmin.sam  # noqa: B018


def test_import_flatmin_alone_imports_no_torch_distributed_and_no_trainer():
    code = (
        "import sys, flatmin; "
        "print(sorted(m for m in sys.modules if m.startswith(('flatmin.', 'torch.distributed'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
