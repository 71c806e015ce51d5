"""How a run stops between steps: the stop flag as every process sees it, and Ctrl-C as a graceful stop."""

from __future__ import annotations

import signal
import threading


class StopRequested(Exception):
    """Raised inside the loop when a stop was asked for; never escapes `fit`."""


class StopSignal:
    """The stop flag (and a checkpoint due by wall-clock time) as every process sees it.

    One process reads its event and its clock. With several, a stop asked on any rank (the kernel's Stop button
    reaches the workers' shared event; Ctrl-C in a terminal reaches every rank, not always between the same
    steps) and a timed checkpoint due on any rank's clock are agreed on with one tiny all-reduce per optimizer step,
    so every rank leaves the loop (or saves) after the same step instead of one waiting forever in the next
    collective. The all-reduce is asynchronous and its result is read one step later: on GPUs the host never
    waits for the device to drain (the read waits on an event recorded a whole step earlier), at the price of
    acting one step later than a single process would.

    Args:
        event: The run's stop event (`threading.Event` or `multiprocessing.Event`).
        accelerator: The run's Accelerator.
    """

    def __init__(self, event, accelerator):
        self.event = event
        self.accelerator = accelerator
        self.agreed = False
        self._pending = None  # (work, device flags, host copy, cuda event) of the exchange started last step

    @property
    def requested(self) -> bool:
        """Between micro-batches: no communication (several processes: what was agreed so far)."""
        return self.event.is_set() if self.accelerator.num_processes == 1 else self.agreed

    def check(self, time_due: bool = False) -> tuple[bool, bool]:
        """At every optimizer-step boundary (with several processes every rank calls it at the same points).

        Args:
            time_due: Whether this rank's clock says a timed checkpoint is due.

        Returns:
            (stop, save): stop after this step; save a timed checkpoint now. With several processes these are
            the flags all ranks raised one step earlier.
        """
        if self.accelerator.num_processes == 1:
            return self.event.is_set(), time_due
        stop, save = self._collect()
        self.agreed = self.agreed or stop
        self._start(int(self.event.is_set()), int(time_due))
        return self.agreed, save

    def close(self) -> None:
        """Finish the exchange still in flight (every rank, when the loop ends)."""
        self._collect()

    def _start(self, *flags) -> None:
        import torch
        import torch.distributed as dist

        device = self.accelerator.device
        values = torch.tensor(flags, dtype=torch.int32, device=device)
        work = dist.all_reduce(values, op=dist.ReduceOp.MAX, async_op=True)
        host = ready = None
        if device.type == "cuda":
            work.wait()  # on CUDA this only orders the current stream after the all-reduce; the host goes on
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self._pending = (work, values, host, ready)

    def _collect(self) -> tuple[bool, bool]:
        if self._pending is None:
            return False, False
        work, values, host, ready = self._pending
        self._pending = None
        if ready is not None:
            ready.synchronize()  # recorded a step ago: long done, the newer kernels keep running
            stop, save = host.tolist()
        else:
            work.wait()
            stop, save = values.tolist()
        return bool(stop), bool(save)


class SigintAsStop:
    """While active (main thread only), Ctrl-C / the notebook's interrupt button sets the stop flag instead of
    raising mid-step, so an interrupt has exactly the graceful result of the Stop button. A second interrupt
    raises KeyboardInterrupt as usual."""

    def __init__(self, stop_event: threading.Event):
        self.stop_event = stop_event
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop_event.is_set():
            raise KeyboardInterrupt
        self.stop_event.interrupted = True
        self.stop_event.set()

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
