"""Training: the composer and loop (``trainer``), the objectives behind one contract (``objectives``), and the
parts a run's state is made of: what a resume must keep (``resume``), self-healing after loss spikes
(``healing``, ``spike``), signals and the STOP / REQUEUE files (``preemption``)."""
from evaclip.train.preemption import REQUEUE_EXIT_CODE
from evaclip.train.trainer import Trainer

__all__ = ["REQUEUE_EXIT_CODE", "Trainer"]
