"""torch.compile for the train step (``engine.compile``), with a count of the graphs each compiled piece builds.

A graph is built on a piece's first call and again on each recompile (a guard failed: another input shape, the
switch to unmasked tuning, grad mode). Each is counted under the piece's name, and under ``<name>/no_grad`` when
built without autograd (evaluation, the feature-caching pass), so a run can say how often its training graphs
were rebuilt (``compile/<name>`` in the metrics). Shapes are compiled static (``dynamic=False``): the global
batch is fixed, and a last partial batch is one more graph rather than a slower dynamic one for every step.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, Optional

import torch


class Compiler:
    """Compiles modules and functions with one backend (``inductor``, ``aot_eager``, ``eager``), counting graphs."""

    def __init__(self, backend: str = "inductor"):
        self.backend_name = backend
        self.backend = torch._dynamo.lookup_backend(backend)
        self.graphs: Counter = Counter()

    def _counting(self, name: str) -> Callable:
        def backend(gm, example_inputs):
            self.graphs[name if torch.is_grad_enabled() else f"{name}/no_grad"] += 1
            return self.backend(gm, example_inputs)

        return backend

    def module(self, name: str, module: torch.nn.Module, fullgraph: bool = True) -> None:
        """Compile ``module`` in place (its parameters and state-dict names stay as they are, so checkpoints,
        DeepSpeed's partitioning and exports do not see the compilation)."""
        module.compile(backend=self._counting(name), fullgraph=fullgraph, dynamic=False)

    def function(self, name: str, fn: Callable, fullgraph: bool = False, dynamic: Optional[bool] = False) -> Callable:
        """``fn`` compiled; ``dynamic=None``: torch's automatic dynamic (a value seen to change becomes symbolic)."""
        return torch.compile(fn, backend=self._counting(name), fullgraph=fullgraph, dynamic=dynamic)

    def metrics(self) -> Dict[str, float]:
        """``compile/<name>``: graphs built so far per compiled piece (1 = never recompiled)."""
        return {f"compile/{k}": float(v) for k, v in sorted(self.graphs.items())}
