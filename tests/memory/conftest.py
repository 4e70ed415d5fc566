import pytest


@pytest.fixture(params=["final", "residual"])
def injection(request):
    return request.param
