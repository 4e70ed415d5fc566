"""The task registry."""
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.tasks import get_task, task_names
from gmem_jax.tasks.babi import BabiTask
from gmem_jax.tasks.synthetic import SyntheticTask


def test_get_task():
    assert task_names() == ["babi", "babilong", "hotpotqa", "synthetic", "zsre"]
    assert isinstance(get_task("synthetic", hops=(2,)), SyntheticTask)
    long = get_task("babilong", source="somewhere", target_tokens=1024, filler="f.txt", tasks=(1,))
    assert isinstance(long, BabiTask) and long.target_tokens == 1024
    with pytest.raises(GmemError, match="unknown task 'squad'; available: babi, babilong"):
        get_task("squad")
    with pytest.raises(GmemError, match="task 'synthetic': .*'hop'"):
        get_task("synthetic", hop=2)
    with pytest.raises(GmemError, match="babilong needs target_tokens"):
        get_task("babilong", source="somewhere")
    with pytest.raises(GmemError, match="unknown layout 'window'"):
        get_task("synthetic", layout="window")
