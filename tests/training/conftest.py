"""Fixtures of the trainer tests."""
import pytest

from trainer_testlib import STANDARD, run_train


@pytest.fixture(scope="session")
def standard_run(tmp_path_factory):
    """One tiny training run (FAST + STANDARD, one device), shared read-only by the tests that compare a variant
    (resumed, sharded, feature-cached) against it: each trainer subprocess costs ~10 s of the suite."""
    workdir = tmp_path_factory.mktemp("standard_run")
    run_train(workdir, *STANDARD)
    return workdir
