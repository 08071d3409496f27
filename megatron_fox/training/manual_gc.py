"""Python's garbage collector run at fixed steps (Megatron-LM's --manual-gc).

Left automatic, the collector runs whenever a rank's allocation count crosses its threshold,
at a different moment on each rank; a rank paused in a full collection holds up every
collective the others wait in. With --manual-gc it is off for the run and collects on every
rank at the same steps: every `manual_gc_interval` training steps (0: never between steps),
and, with --manual-gc-eval (the default), a full collection before each evaluation and a
young-generation one after it (what the evaluation made).
"""

from __future__ import annotations

import contextlib
import gc


class ManualGC:
    """The collector's schedule for one run; every method is a no-op without --manual-gc."""

    def __init__(self, args):
        self.on, self.interval, self.around_eval = args.manual_gc, args.manual_gc_interval, args.manual_gc_eval

    @contextlib.contextmanager
    def running(self):
        """The run: automatic collection off (one full collection first), back on after."""
        if not self.on:
            yield
            return
        was_enabled = gc.isenabled()
        gc.disable()
        gc.collect()
        try:
            yield
        finally:
            if was_enabled:
                gc.enable()

    def after_step(self, step: int) -> None:
        """Collect after training step `step` (1-based) where the interval says so."""
        if self.on and self.interval and step % self.interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def evaluation(self):
        """One evaluation pass."""
        if self.on and self.around_eval:
            gc.collect()
        yield
        if self.on and self.around_eval:
            gc.collect(generation=0)
