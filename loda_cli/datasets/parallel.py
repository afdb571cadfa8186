"""One function over many images, across processes: what checking and preparing share."""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator, Optional, Sequence

from loda_cli.errors import DatasetError

def run_parallel(
    fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], workers: Optional[int]
) -> Iterator[tuple[int, Any]]:
    """``(task index, fn(*task))`` in completion order, across processes when workers > 1."""
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    if workers == 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
            yield i, fn(*task)
        return
    from concurrent.futures.process import BrokenProcessPool

    # A bounded number in flight keeps memory flat for 40,000-image datasets.
    limit = workers * 4
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: dict[Any, int] = {}
        queue = iter(enumerate(tasks))
        try:
            for i, task in queue:
                pending[pool.submit(fn, *task)] = i
                if len(pending) >= limit:
                    break
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield pending.pop(future), future.result()
                for i, task in queue:
                    pending[pool.submit(fn, *task)] = i
                    if len(pending) >= limit:
                        break
        except BrokenProcessPool:
            raise DatasetError("a worker process died (out of memory?); rerun with fewer --workers") from None
        finally:
            for future in pending:
                future.cancel()
