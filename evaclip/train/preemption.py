"""Stopping a run cleanly: SIGTERM / SIGINT / SIGUSR1 to a trainer process, or a file ``<run dir>/STOP``, make
the run finish its step, checkpoint, write ``<run dir>/REQUEUE`` and exit with ``REQUEUE_EXIT_CODE``; the launcher
(launch/slurm/train.sbatch) then requeues the job, which resumes from that checkpoint. A signal that comes while
the run has waited more than ``STALLED_WAIT_S`` for data (or skips a spike's window) ends it at once, no save."""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable, Dict, Optional

import torch

from evaclip import dist as edist
from evaclip.errors import StopInterrupt, TrainingStopped

REQUEUE_EXIT_CODE = 85  # the trainer exits with this code after a preemption save
STOP_FILE = "STOP"  # created in the run dir (e.g. by the sbatch script's pre-timeout trap): save and exit
REQUEUE_FILE = "REQUEUE"  # written by the trainer on such an exit; the sbatch script then requeues the job
STALLED_WAIT_S = 5.0  # a signal after this long in a data wait (or a skip) ends it: the step may never come
SIGNAL_REPEAT_S = 2.0  # a stop signal repeated within this many seconds is one request (see StopRequests.install)


class StopRequests:
    """The stop requests of one run: signal handlers while it trains, the STOP file, the REQUEUE marker."""

    def __init__(self, run_dir: str, log: Callable[[str], None], waiting: Callable[[], Optional[tuple]] = lambda: None):
        self.run_dir, self.log, self.waiting = run_dir, log, waiting
        self.signal: Optional[int] = None
        self._signal_at = 0.0
        self._old: Optional[Dict] = None
        if edist.is_main() and os.path.exists(os.path.join(run_dir, REQUEUE_FILE)):
            os.remove(os.path.join(run_dir, REQUEUE_FILE))  # this is the requeued run

    def install(self) -> None:
        """SIGTERM / SIGINT / SIGUSR1: finish the step, checkpoint, exit 85 (requeue); a second one exits at once.
        The DataLoader workers ignore SIGTERM / SIGINT (``data.loader.worker_init``), so a signal to the whole process
        group (``timeout``, Slurm, Ctrl-C) reaches the main process with its workers still alive. A repeat within
        ``SIGNAL_REPEAT_S`` of the first is the same request delivered twice, not a second one: Slurm signals every
        process of a job step and torchrun passes the signal it got on to its workers."""

        def handler(signum, frame):
            now = time.monotonic()
            if self.signal is not None:
                if now - self._signal_at < SIGNAL_REPEAT_S:
                    return
                print(f"second signal ({signal.Signals(signum).name}): exiting now without a checkpoint",
                      file=sys.stderr, flush=True)
                os._exit(128 + signum)
            self.signal, self._signal_at = signum, now
            self.check_wait(StopInterrupt)  # a stalled wait: end it now (not TrainingStopped, see StopInterrupt)
            self.log(f"received {signal.Signals(signum).name}: finishing this step, saving, exiting for requeue "
                     f"(send it again, {SIGNAL_REPEAT_S:g} s or more later, to exit at once)")

        self._old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}

    def check_wait(self, error: type = TrainingStopped) -> None:
        """Raise ``error`` when a stop signal has come and the run has waited for data (or skipped a spike's
        window) more than ``STALLED_WAIT_S``: the step may never come. Called by the handler and, for a signal that
        came early in a long skip, between the batches the skip reads."""
        wait, now = self.waiting(), time.monotonic()
        if self.signal is None or wait is None or now - wait[0] <= STALLED_WAIT_S:
            return
        raise error(f"received {signal.Signals(self.signal).name} after {now - wait[0]:.0f} s waiting {wait[1]}: "
                    "stopping without a checkpoint (the last complete one is kept; rerun to resume from it)")

    def restore(self) -> None:
        """Give the caller (a notebook, a test process, a wrapper script) its own handlers back."""
        for sig, old in (self._old or {}).items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = None

    def asked(self, device: torch.device) -> bool:
        """A signal on any rank or a STOP file in the run dir: agreed by all ranks (collective)."""
        asked = self.signal is not None or (edist.is_main() and os.path.exists(os.path.join(self.run_dir, STOP_FILE)))
        flag = torch.tensor([1.0 if asked else 0.0], device=device)
        edist.all_reduce_sum(flag)
        return flag.item() > 0

    def mark_requeue(self, step: int) -> None:
        """After the stop's checkpoint (rank 0): the STOP file consumed, the REQUEUE marker written."""
        if not edist.is_main():
            return
        stop = os.path.join(self.run_dir, STOP_FILE)
        if os.path.exists(stop):
            os.remove(stop)
        with open(os.path.join(self.run_dir, REQUEUE_FILE), "w") as f:
            f.write(f"step {step}: saved after a stop request; resume with the same command\n")
        self.log(f"saved at step {step} after a stop request; exiting with code {REQUEUE_EXIT_CODE}")
