"""Small gloo process groups for the distributed tests: CPU, loopback only, every run bounded in time."""
import datetime
import os
import platform
import socket
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


def run_workers(worker, args, nprocs, timeout_s, what):
    """Spawn worker(rank, *args) in nprocs processes; fail the test after timeout_s and kill what is left
    (only the processes this call started)."""
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
