"""Work done ``jobs`` at a time: each task in a spawned process of one thread, the results in the tasks' order.

On a few CPU cores a tiny CLIP's training step does not keep two threads busy, so two one-thread
processes side by side finish more work than one process of two threads. A forked copy of a process
that has run OpenMP threads can hang, hence spawn.
"""
from __future__ import annotations

import traceback
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def each(fn: Callable[[Task], Result], tasks: Iterable[Task], jobs: int) -> Iterator[Result]:
    """``fn(task)`` for every task, in order: in this process one after another when ``jobs`` is 1 (or there
    is one task), else in ``jobs`` processes at once (``fn`` and the tasks must pickle)."""
    tasks: List[Task] = list(tasks)
    if jobs == 1 or len(tasks) < 2:
        yield from (fn(task) for task in tasks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        yield from pool.map(fn, tasks)


def stage_errors() -> tuple:
    """The exceptions a stage fails with (bad settings, a failed run, a missing file): recorded, not raised,
    so that the work beside it goes on."""
    from par.errors import ParError

    return ParError, RuntimeError, ValueError, OSError


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def attempt(task: Callable[[], Result]) -> Tuple[Optional[Result], str]:
    """``(task(), "")``, or ``(None, its one-line error)`` when it fails as a stage fails."""
    try:
        return task(), ""
    except stage_errors() as e:
        traceback.print_exc()
        return None, one_line(e)
