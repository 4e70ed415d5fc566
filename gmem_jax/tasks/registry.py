"""Tasks by name: `get_task("hotpotqa", source=...)`,
`get_task("babilong", source=..., filler=..., target_tokens=4096)`."""
from __future__ import annotations

from typing import Any, Callable

from gmem_jax.errors import GmemError
from gmem_jax.tasks.babi import BabiTask
from gmem_jax.tasks.base import Task
from gmem_jax.tasks.hotpotqa import HotpotQATask
from gmem_jax.tasks.synthetic import SyntheticTask
from gmem_jax.tasks.zsre import ZsRETask


def _babilong(**kwargs: Any) -> BabiTask:
    """bAbI with filler: target_tokens and filler are required (BabiTask checks them)."""
    if kwargs.get("target_tokens") is None or kwargs.get("filler") is None:
        raise GmemError("babilong needs target_tokens=N and filler=PATH (a text file, e.g. WikiText-2 valid.txt)")
    return BabiTask(**kwargs)


_TASKS: dict[str, Callable[..., Task]] = {
    "hotpotqa": HotpotQATask,
    "zsre": ZsRETask,
    "babi": BabiTask,
    "babilong": _babilong,
    "synthetic": SyntheticTask,
}


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, **kwargs: Any) -> Task:
    """The task called `name`, constructed with kwargs (see each task class for its options)."""
    if name not in _TASKS:
        raise GmemError(f"unknown task {name!r}; available: {', '.join(task_names())}")
    try:
        return _TASKS[name](**kwargs)
    except TypeError as e:  # a wrong keyword: say which task and which argument
        raise GmemError(f"task {name!r}: {e}; see the options of {name} in gmem_jax.tasks") from None
