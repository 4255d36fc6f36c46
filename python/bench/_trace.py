"""Live tensor bytes over a block of code, split into named phases (the memory suite's meter).

CUDA: ``torch.cuda.memory_allocated`` and ``max_memory_allocated`` (the caching allocator's own
count of bytes in live tensors). CPU: the ``torch.profiler`` memory events
(``profile_memory=True``): c10's CPU allocator reports every allocation and free with its size,
so the running sum over the events is the bytes of live tensor storages -- independent of glibc's
malloc caching or RSS, and seeing all of torch (which ``tracemalloc`` does not). Phases are
``record_function`` ranges.
"""

from __future__ import annotations

import bisect
import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List

import torch

__all__ = ["Phase", "MemoryTrace", "tensor_bytes", "state_bytes"]

_LABEL = "oplora.memory/"


@dataclass
class Phase:
    """Live bytes at a phase's start and end, and the highest live bytes inside it; all counted
    from the start of the trace (so a negative value means less is live than then)."""

    start: int
    end: int
    peak: int


class MemoryTrace:
    """Live tensor bytes over a block of code, split into named phases.

    ``with MemoryTrace(device) as trace:`` then ``with trace.phase("forward"): ...``; after the
    block ``trace.phases[name]`` is a :class:`Phase` (bytes relative to the trace start). Names
    must be unique within a trace. CPU: from the profiler's allocator events (see the module
    docstring); CUDA: from the caching allocator's counters. Blocks allocated before the trace
    and freed inside it are not seen on the CPU (the profiler knows no size for them), so start
    the trace before anything it measures is allocated.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.phases: Dict[str, Phase] = {}
        self._order: List[str] = []
        self._prof = None
        self._base = 0

    def __enter__(self) -> "MemoryTrace":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True)
            self._prof.__enter__()
        return self

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the code inside the ``with`` as phase ``name``."""
        if name in self._order:
            raise ValueError(f"phase {name!r} was already measured in this trace")
        self._order.append(name)
        if self.device.type != "cuda":
            with torch.profiler.record_function(_LABEL + name):
                yield
            return
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.memory_allocated(self.device) - self._base
        yield
        torch.cuda.synchronize(self.device)
        self.phases[name] = Phase(start, torch.cuda.memory_allocated(self.device) - self._base,
                                  torch.cuda.max_memory_allocated(self.device) - self._base)

    def __exit__(self, *exc) -> None:
        if self._prof is None:
            return
        self._prof.__exit__(*exc)
        if exc[0] is not None:
            return
        events = list(self._prof.profiler.kineto_results.events())
        memory = sorted((e.start_ns(), e.nbytes()) for e in events
                        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
        ranges = {e.name()[len(_LABEL):]: (e.start_ns(), e.end_ns()) for e in events if e.name().startswith(_LABEL)}
        times = [t for t, _ in memory]
        running, live = 0, []
        for _, nbytes in memory:
            running += nbytes
            live.append(running)
        def live_at(t: int) -> int:  # live bytes after every event up to and including time t
            i = bisect.bisect_right(times, t)
            return live[i - 1] if i else 0

        for name in self._order:
            t0, t1 = ranges[name]
            lo, hi = bisect.bisect_right(times, t0), bisect.bisect_right(times, t1)
            start = live_at(t0)
            self.phases[name] = Phase(start, live_at(t1), max([start, *live[lo:hi]]))


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a shared storage counts once)."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            key = (storage.data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``opt.state``."""
    return tensor_bytes(v for entry in opt.state.values() for v in entry.values())
