"""Whether the training step is compiled, and what torch.compile made of it.

``train.compile``: "on", "off" or "auto" (on for CUDA, off on the CPU, where inductor's
compile time outweighs what it saves on a short run). "on" where inductor cannot work
(no C++ compiler for CPU code, no Triton for GPU code) is a one-line error at start-up
rather than a traceback at the first step; "auto" then trains eagerly and says why.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable

import torch

from zturbo.errors import UsageError


def inductor_problem(device: torch.device) -> str | None:
    """Why torch.compile's default backend cannot generate code for ``device`` here (None: it can)."""
    if importlib.util.find_spec("torch._inductor") is None:
        return f"this torch build ({torch.__version__}) has no inductor"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "inductor's GPU code needs Triton, which is not installed (it ships with CUDA builds of torch)"
        return None
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "inductor's CPU code needs a C++ compiler (g++ or clang++), and none is on PATH"
    return None


def resolve_compile(mode: str, device: torch.device, log: Callable[[str], None] | None = None) -> bool:
    """Whether to compile: "on" and "off" as said, "auto" on for CUDA when inductor works there."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False
    problem = inductor_problem(device)
    if problem is None:
        return True
    if mode == "on":
        raise UsageError(f"train.compile=on: torch.compile cannot run here: {problem}",
                         "use --compile off (train.compile = \"off\") or install a torch with a working inductor")
    if log is not None:
        log(f"training eagerly: {problem}")
    return False


def _counters() -> tuple[dict[str, int], int]:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"]), int(counters["stats"]["unique_graphs"])


class CompileWatch:
    """Counts the graph breaks torch.compile reports while the first steps are traced.

    Dynamo's counters are process-wide: what this engine added is the difference from
    a snapshot taken when it was built. Dynamo counts a break each time its analysis
    meets it (restarts and retraces count again), so ``graph_breaks`` is the number of
    distinct breaks (reasons); ``break_events`` the raw count, ``graphs`` the graphs compiled.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._before, self._graphs_before = _counters() if enabled else ({}, 0)
        self._logged = False

    def report(self) -> dict[str, object]:
        if not self.enabled:
            return {"compiled": False, "graph_breaks": None, "break_events": None, "graphs": None, "reasons": {}}
        now, graphs = _counters()
        reasons = {k: v - self._before.get(k, 0) for k, v in now.items() if v > self._before.get(k, 0)}
        return {"compiled": True, "graph_breaks": len(reasons), "break_events": sum(reasons.values()),
                "graphs": graphs - self._graphs_before, "reasons": reasons}

    def after_step(self, log: Callable[[str], None]) -> None:
        """Once, after the first traced step: a log line with the count and each reason."""
        if not self.enabled or self._logged:
            return
        self._logged = True
        r = self.report()
        why = "; ".join(reason.splitlines()[0][:160] for reason in r["reasons"])
        log(f"torch.compile: {r['graph_breaks']} graph break(s), {r['graphs']} graph(s)" + (f": {why}" if why else ""))
