"""Small gloo process groups for the distributed tests: CPU, loopback only, every run bounded in time."""
import datetime
import os
import platform
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def init_gloo(rank, world, port):
    """In a spawned worker: one thread, loopback, a process group that gives up after 60 s."""
    torch.set_num_threads(1)
    if platform.system() == 'Linux':
        os.environ.setdefault('GLOO_SOCKET_IFNAME', 'lo')
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def close_gloo(ok):
    """End of a worker. After a clean run: a barrier first (a rank that tears its group down while the other
    still has gloo traffic in flight, FSDP's last gathers, fails the peer with a closed connection: seen once
    in ~15 full-suite runs), then an immediate exit once the results are on disk. The process teardown of the
    CUDA torch build (profiler/gloo threads) once aborted a finished worker with "terminate called without an
    active exception" (SIGABRT), failing a test whose work had passed. After an error: no barrier (the peer
    may never reach it) and a normal exit, so the traceback reaches the parent."""
    try:
        if ok:
            dist.barrier()
    finally:
        dist.destroy_process_group()
    if ok:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


_PORT_ERRORS = ('Address already in use', 'EADDRINUSE', 'Connection refused', 'ECONNREFUSED')


def run_workers(worker, args, nprocs, timeout_s, what):
    """Spawn worker(rank, port, *args) in nprocs processes on a free loopback port; fail the test after
    timeout_s and kill what is left (only the processes this call started). The port is free when picked but
    may be taken before gloo binds it: that one failure is retried once on a new port."""
    for attempt in (1, 2):
        try:
            return _run_once(worker, (free_port(), *args), nprocs, timeout_s, what)
        except mp.ProcessRaisedException as e:
            if attempt == 2 or not any(s in str(e) for s in _PORT_ERRORS):
                raise


def _run_once(worker, args, nprocs, timeout_s, what):
    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method='spawn')
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f'{what} workers did not finish within {timeout_s}s')
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
