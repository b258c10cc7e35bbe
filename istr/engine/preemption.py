"""Preemption of a single-process run (docs/sweeps.md#slurm): SIGUSR1 (SLURM's warning before the time limit)
or SIGTERM (scancel, preemption) makes the train loop checkpoint the step it is on and exit ``PREEMPTED_EXIT``;
the sweep harness (istr/sweep/trial.py) forwards the same signals to its child and reads that exit status as
"resume later".
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

PREEMPTED_EXIT = 75  # exit status after a preemption signal: checkpointed, resume later (sysexits' EX_TEMPFAIL)
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # SLURM's warning before the time limit; scancel, preemption


def catch_preemption(enabled: bool) -> tuple[list[int], Callable[[], None]]:
    """SIGUSR1/SIGTERM -> appended to the returned list, so the loop can checkpoint its step before it exits;
    and the function that restores the previous handlers.

    Only in a single-process run's main thread: under DDP every rank would have to agree on the step to stop at.
    """
    caught: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        return caught, lambda: None
    previous = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in PREEMPT_SIGNALS}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return caught, restore
