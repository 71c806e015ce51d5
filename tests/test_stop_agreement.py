"""With several processes, a stop asked on one rank and a timed checkpoint due on one rank's clock are agreed by
all ranks after the same step (launch.StopSignal: an asynchronous all-reduce read one step later). Two real gloo
ranks on CPU, without a model: a few seconds."""

from __future__ import annotations

import os
import socket
import threading
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from peft_magic.launch import StopSignal


def _rank(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        event = threading.Event()
        signal = StopSignal(event, SimpleNamespace(num_processes=2, device=torch.device("cpu")))
        seen = []
        for step in range(1, 9):
            if rank == 1 and step == 3:
                event.set()  # rank 1 alone is asked to stop during step 3
            stop, save = signal.check(time_due=(rank == 0 and step == 2))  # rank 0's clock: save after step 2
            seen.append((step, stop, save))
            if stop:
                break
        signal.close()
        results[rank] = seen
    finally:
        dist.destroy_process_group()


def test_every_rank_stops_and_saves_after_the_same_step():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.start_processes(_rank, args=(port, results), nprocs=2, start_method="spawn", join=True)
    assert results[0] == results[1]  # the same decisions at the same steps on both ranks
    # each flag takes effect one step after a rank raised it: the save after step 3, the stop after step 4
    assert results[0] == [(1, False, False), (2, False, False), (3, False, True), (4, True, False)]


def test_one_process_acts_in_the_same_step():
    event = threading.Event()
    signal = StopSignal(event, SimpleNamespace(num_processes=1, device=torch.device("cpu")))
    assert signal.check(time_due=True) == (False, True)
    event.set()
    assert signal.check() == (True, False) and signal.requested
