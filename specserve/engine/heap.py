"""Keeping Python's garbage collector out of the way of a process that serves.

An engine process holds hundreds of thousands of long-lived objects (modules, the model, the
tokenizer), and every full collection walks them all: ~200 ms on a CPU, a stall of every step
in flight (``benchmarks/gc_pauses.py``). A process that exists to serve freezes what it made to
start, so that collections skip it; only such processes call this (a library freezing its
host's heap would keep dropped engines alive).
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive now out of the collector's sight."""
    gc.collect()
    gc.freeze()
