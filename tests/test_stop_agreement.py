"""With several processes, a stop asked on one rank and a timed checkpoint due on one rank's clock are agreed by
all ranks after the same step (stopping.StopSignal: an asynchronous all-reduce read one step later). Two real gloo
ranks on CPU, without a model: a few seconds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import torch

from peft_magic.training.stopping import StopSignal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


RANK_SCRIPT = """
import json, os, sys, threading
from types import SimpleNamespace
import torch, torch.distributed as dist
from peft_magic.training.stopping import StopSignal

rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2)
event = threading.Event()
signal = StopSignal(event, SimpleNamespace(num_processes=2, device=torch.device("cpu")))
seen = []
for step in range(1, 9):
    if rank == 1 and step == 3:
        event.set()  # rank 1 alone is asked to stop during step 3
    stop, save = signal.check(time_due=(rank == 0 and step == 2))  # rank 0's clock: a timed save after step 2
    seen.append([step, stop, save])
    if stop:
        break
signal.close()
dist.destroy_process_group()
print("SEEN " + json.dumps(seen))
"""


def test_every_rank_stops_and_saves_after_the_same_step():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    seen = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        seen.append(json.loads(next(line for line in out.splitlines() if line.startswith("SEEN "))[5:]))
    assert seen[0] == seen[1]  # the same decisions at the same steps on both ranks
    # each flag takes effect one step after a rank raised it: the save after step 3, the stop after step 4
    assert seen[0] == [[1, False, False], [2, False, False], [3, False, True], [4, True, False]]


def test_one_process_acts_in_the_same_step():
    event = threading.Event()
    signal = StopSignal(event, SimpleNamespace(num_processes=1, device=torch.device("cpu")))
    assert signal.check(time_due=True) == (False, True)
    event.set()
    assert signal.check() == (True, False) and signal.requested
