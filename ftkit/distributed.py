"""Several processes on one run (torchrun, accelerate launch, ``ftkit run --nproc``): who does what.

Every process (rank) loads the data and the model, trains on its share of each batch and
evaluates its share of the test set. Rank 0 alone touches the run folder (creates, writes,
renames) and prints; the others wait for it wherever its work matters to them.

A step that fails on one rank fails on all: after each step every rank reports how it went, so
none is left waiting at the next collective, and rank 0 prints the one error line (the others
exit quietly with the same code). Training itself is the exception: a rank that fails inside the
Trainer exits, and the launcher stops the rest.

In one process every helper here is the obvious identity and imports no torch (``launch``, which
starts the processes, is the one that needs it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from ftkit.errors import FtkitError

T = TypeVar("T")

#: Whether this process joined a process group (``init``): its exit skips the interpreter's teardown.
_started = False


class PeerFailed(FtkitError):
    """A step failed on another rank; ``exit_code`` is that rank's (the CLI prints it on rank 0 only)."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def world_size() -> int:
    """How many processes train this run (``WORLD_SIZE``, set by torchrun and accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that writes the run folder and prints."""
    return rank() == 0


def _joined() -> bool:
    """Whether this process is in a process group (checked without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    return world_size() > 1 and dist is not None and dist.is_available() and dist.is_initialized()


def init() -> None:
    """Join the launcher's process group: NCCL with one GPU per rank on CUDA, gloo on the CPU.

    Done before the Trainer exists (setup and the baseline evaluation need barriers and gathers);
    accelerate then uses this group instead of making its own.
    """
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    global _started
    if dist.is_initialized():
        return
    _started = True
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def shutdown() -> None:
    """Leave the process group after a successful run (torch warns about one left open)."""
    if _joined():
        import torch.distributed as dist

        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``: Python's exit steps, without the interpreter's teardown.

    Why not a plain ``sys.exit``: DistributedDataParallel keeps its process group alive after
    ``destroy_process_group`` (measured with torch 2.13: gloo's worker and transport threads are
    still running when ``main`` returns; without DDP the same call stops them). Those threads then
    meet the interpreter's teardown, and when one of them needs the GIL there (to free a tensor
    of a finished collective) the process aborts with "terminate called without an active
    exception" (pytorch/pytorch#190489; the upstream fix, PR 179291, was abandoned). That turned
    one in many successful 2-process runs into exit status 1. So a rank does what the
    interpreter's exit would do for Python code (join threads, ``atexit`` handlers: logging and
    temporary folders, flush the streams) and then leaves with ``os._exit``.
    """
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 - private, but it is the interpreter's own atexit step
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written
            pass
    os._exit(code)


def started() -> bool:
    """Whether this process joined a process group at some point (see ``exit_process``)."""
    return _started


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not _joined():
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (what the others pass is ignored)."""
    if not _joined():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(nproc: int, args: list[str]) -> int:
    """Run ``python -m ftkit ARGS`` as ``nproc`` processes under torchrun; returns the exit code.

    torchrun finds a free port itself (a rendezvous on localhost). Its own failure report (a
    traceback and a table of ranks) is left out: rank 0 has printed the one error line already.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Share the cores instead of torchrun's default of one thread per process (and its warning).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.disable(logging.ERROR)  # this process only launches: torchrun's log lines are noise here
    try:
        run(parse_args(["--nproc_per_node", str(nproc), "-m", "ftkit", *args]))
    except ChildFailedError as error:
        codes = {rank: failure.exitcode for rank, failure in error.failures.items()}
        code = codes.get(0, 0)
        return code if code > 0 else next((c for c in codes.values() if c > 0), 1)
    except SignalException as error:
        return 128 + int(error.sigval)
    return 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every world_size-th item from its rank (lengths stay mixed)."""
    return list(items[rank()::world_size()]) if _joined() else list(items)


def unshard(parts: Sequence[Sequence[T]]) -> list[T]:
    """Put the shards of all ranks (in rank order) back into the original order."""
    merged: list[Any] = [None] * sum(len(part) for part in parts)
    for index, part in enumerate(parts):
        merged[index::len(parts)] = part
    return merged


def together(step: Callable[[], T]) -> T:
    """Run ``step`` on every rank; if it fails on any, raise on every rank."""
    result, error = _attempt(step)
    _settle(error)
    return result  # type: ignore[return-value]


def on_main(step: Callable[[], T]) -> T | None:
    """Run ``step`` on rank 0 while the others wait; its result on rank 0, None elsewhere."""
    result, error = _attempt(step) if is_main() else (None, None)
    _settle(error)
    return result


def from_main(step: Callable[[], T]) -> T:
    """Run ``step`` on rank 0 and give its result to every rank (what it read from the run folder)."""
    return broadcast(on_main(step))


def main_first(step: Callable[[], T]) -> T:
    """Run ``step`` on rank 0, then on the others: downloads and caches are filled once."""
    result, error = _attempt(step) if is_main() else (None, None)
    _settle(error)
    if not is_main():
        result, error = _attempt(step)
    _settle(error)
    return result  # type: ignore[return-value]


def _attempt(step: Callable[[], T]) -> tuple[T | None, Exception | None]:
    # KeyboardInterrupt and SystemExit pass through: the launcher stops every rank then.
    try:
        return step(), None
    except Exception as error:  # noqa: BLE001 - reported to every rank by _settle
        return None, error


def _settle(error: Exception | None) -> None:
    """Every rank says how its part of a step went; if any failed, every rank raises."""
    if not _joined():
        if error is not None:
            raise error
        return
    reports = all_gather(None if error is None else _describe(error))
    failed = [(index, report) for index, report in enumerate(reports) if report is not None]
    if not failed:
        return
    if error is not None and is_main():
        raise error
    where, (message, code) = failed[0]
    raise PeerFailed(f"rank {where}: {message}", exit_code=code) from error


def _describe(error: Exception) -> tuple[str, int]:
    if isinstance(error, FtkitError):
        return str(error), error.exit_code
    return (f"internal error: {type(error).__name__}: {error} (run again with `ftkit --debug ...` for the "
            "traceback, and please report it)"), 1
