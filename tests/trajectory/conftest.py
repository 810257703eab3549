import pytest

from flatmin.trajectory import _topk_compiled


@pytest.fixture(params=["compiled", "eager"])
def topk_path(request, monkeypatch):
    """Run a top-k test once through the compiled loops (numba) and once through the
    eager torch code, whichever the installed packages would pick."""
    if request.param == "compiled" and not _topk_compiled.ENABLED:
        pytest.skip("numba is not installed (pip install flatmin[fast])")
    monkeypatch.setattr(_topk_compiled, "ENABLED", request.param == "compiled")
    return request.param
