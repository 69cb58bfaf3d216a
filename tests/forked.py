"""Run a peer tool in a forked process with a time limit (Torch-Pruning's graph building can stall)."""
from __future__ import annotations

import multiprocessing
import time


def call_forked(target, args: tuple, timeout: float) -> tuple[dict | None, str]:
    """``target(*args, conn)`` in a forked process that must ``conn.send`` one dict within
    ``timeout`` seconds; returns ``(that dict, "")`` or ``(None, why)`` (a timeout, or
    the exit code of a process that died), killing the process if it is still running.

    >>> def work(x, conn):
    ...     conn.send({"double": 2 * x})
    >>> call_forked(work, (21,), 30)
    ({'double': 42}, '')
    """
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    start = time.perf_counter()
    proc.start()
    child.close()
    result = None
    if parent.poll(timeout):
        try:
            result = parent.recv()
        except EOFError:
            result = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is not None:
        return result, ""
    late = time.perf_counter() - start >= timeout
    return None, f"timeout {timeout:.0f} s" if late else f"process died (exit {proc.exitcode})"
