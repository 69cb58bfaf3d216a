"""Run a function on several forked ranks of a gloo process group (CPU, no GPU needed).

Ranks fork from a fork server that has torch and fxprune imported (spawned ones re-import them:
about 20 s on a busy 2-core CI); ``target`` must initialise the process group itself from
the port it is given, with a timeout, so that a broken collective fails instead of hanging.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import traceback


def free_port() -> int:
    """A TCP port nothing listens on now, for ``init_method="tcp://127.0.0.1:PORT"``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(target, rank: int, world: int, port: int, args: tuple, err_dir: str) -> None:
    try:
        target(rank, world, port, *args)
    except BaseException:
        with open(os.path.join(err_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def launch(target, args: tuple, err_dir: str, world: int = 2, timeout: float = 300) -> None:
    """``target(rank, world, port, *args)`` on ``world`` forked ranks; raises with the
    ranks' tracebacks (written under ``err_dir``) if any fails or outlives ``timeout``."""
    port = free_port()
    # forked from a fork server, not from this process: a process that ran autograd (any
    # earlier test that called backward) cannot fork children that run it again
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "fxprune"])
    procs = [ctx.Process(target=_run, args=(target, r, world, port, args, err_dir)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
    errors = [open(os.path.join(err_dir, f)).read() for f in sorted(os.listdir(err_dir)) if f.endswith(".err")]
    if errors or any(p.exitcode for p in procs):
        raise RuntimeError("distributed run failed:\n" + ("\n".join(errors) or
                           f"exit codes {[p.exitcode for p in procs]}"))
