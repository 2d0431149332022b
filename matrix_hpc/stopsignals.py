"""Stop signals: one meaning of INT, TERM and USR2 in every process of matrix-hpc.

Every long-running process installs :class:`StopSignals` once, in its main thread:
``matrix-hpc run``, each node of a Slurm job (``cluster/slurm/bootstrap.py``),
``matrix-hpc serve`` and ``view``, and the embedded engine's server process. It is a
leaf module (the standard library only), so every layer may use it.

========  ============================================  ===============================================
signal    who sends it                                  what it means
========  ============================================  ===============================================
INT       a user's Ctrl-C (the terminal signals the     stop: no new task; tasks in flight get
          whole process group)                          ``run.stop_grace_s``; finished work is saved;
                                                        exit 130. An INT while a stop is under way
                                                        (a second Ctrl-C) aborts at once
                                                        (``KeyboardInterrupt``): tasks in flight are
                                                        abandoned, committed work is kept.
TERM      Slurm (``scancel``, ``scontrol requeue``,     the KILL follows soon (Slurm's KillWait): stop
          the time limit, the end of a preemption's     with no grace: tasks in flight are abandoned,
          GraceTime), ``kill``, a service manager       finished work is saved at once; exit 130. It
                                                        never aborts, however many come (Slurm and
                                                        ``srun`` may each deliver one), and it cuts the
                                                        grace of a stop already under way to 0.
USR2      Slurm's warning: ``--signal=USR2@N`` before   stop as INT does (tasks in flight get
          the time limit; a preemption (with            ``run.stop_grace_s``); on Slurm, rank 0 then
          ``SlurmctldParameters=preempt_send_user_      requeues the job (``scontrol requeue``) as soon
          signal``)                                     as the store is saved; the next life resumes.
========  ============================================  ===============================================

A process that only serves (``serve``, ``view``, an engine: ``serving=True``) has no
tasks of its own: INT and TERM stop it, a second INT aborts, and USR2 leaves it serving
(the run it serves is stopping; its owner stops it after).

The stop flag is what :class:`~matrix_hpc.runtime.runner.StopFlag` asks for: ``is_set()``
and ``grace_s`` (``inf``: the run's own grace; 0 once a TERM came). ``reason`` is the first
signal's name; ``cause`` may be set by whoever knows why it came (the Slurm entry point:
``time_limit``, ``preempted``...), through ``on_first``, which runs on a thread of its own
(never inside the handler) when the first signal arrives; :meth:`settled_cause` waits for it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["STOP_SIGNALS", "StopSignals", "handlers_kept"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def notice(name: str, grace_s: float | None, first: bool) -> str:
    """The one line a run prints when a stop signal arrives."""
    if not first:
        return f"{name}: tasks in flight are abandoned now, finished work is saved"
    if name == "SIGTERM":
        return "SIGTERM: stopping intake; tasks in flight are abandoned (the KILL is near), finished work is saved"
    grace = f"get up to {grace_s:.0f}s" if grace_s is not None else "may finish"
    again = " (again to abort)" if name == "SIGINT" else ""
    return f"{name}: stopping intake; tasks in flight {grace}, finished work is saved{again}"


class StopSignals:
    """The process's stop flag, set by INT, TERM or USR2 (see the module's table).

    ``notify`` prints the notice (default: stderr; None for none); ``grace_s`` is the run's
    ``run.stop_grace_s``, for the notice only; ``on_first(name)`` runs on a thread of its own
    when the first signal comes. Construct it in the main thread: it installs the handlers.
    """

    def __init__(
        self,
        notify: Callable[[str], None] | None = _stderr,
        grace_s: float | None = None,
        on_first: Callable[[str], None] | None = None,
        serving: bool = False,
    ) -> None:
        self._event = threading.Event()
        self._notify, self._grace_text, self._on_first, self.serving = notify, grace_s, on_first, serving
        self.reason: str | None = None
        """The first stop signal's name (``SIGINT``, ``SIGTERM``, ``SIGUSR2``)."""
        self.seen: list[str] = []
        """Every stop signal that came, in order."""
        self.at: float | None = None
        """``time.monotonic()`` of the first signal."""
        self.at_wall: float | None = None
        """``time.time()`` of the first signal."""
        self.grace_s = float("inf")
        """Caps ``run.stop_grace_s``: 0 once a TERM came."""
        self.terminating = False
        """A TERM came (even after another signal): the KILL is near, no grace is left."""
        self.cause: str | None = None
        """Why the stop came, where someone knows (set through ``on_first``)."""
        self._first_done: threading.Thread | None = None
        self._aborted = False
        self.previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on)

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def restore(self) -> None:
        """Put back the handlers that were there before (tests; a process that lives on)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def settled_cause(self, timeout_s: float = 5.0) -> str | None:
        """``cause`` once ``on_first`` has run (waiting at most ``timeout_s``)."""
        t = self._first_done
        if t is not None:
            t.join(timeout_s)
        return self.cause

    def _on(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGUSR2 and self.serving:
            return  # a server keeps serving: the run it serves decides when it stops
        first = not self._event.is_set()
        if signum == signal.SIGINT and not first:
            if self._aborted:
                return  # the abort is under way (shutting Ray down): let it finish
            # A second Ctrl-C: abort. asyncio reports the futures an abort cancels as
            # "never retrieved": noise here.
            import logging

            self._aborted = True
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            raise KeyboardInterrupt
        self.seen.append(name)
        if first:
            self.reason, self.at, self.at_wall = name, time.monotonic(), time.time()
        shrinks = signum == signal.SIGTERM and not self.terminating
        if signum == signal.SIGTERM:
            self.grace_s, self.terminating = 0.0, True
        if self._notify is not None and not self.serving and (first or (shrinks and self.reason != "SIGTERM")):
            self._notify(notice(name, self._grace_text, first))
        self._event.set()
        if first and self._on_first is not None:
            self._first_done = threading.Thread(target=self._on_first, args=(name,), name="stop-cause", daemon=True)
            self._first_done.start()


@contextlib.contextmanager
def handlers_kept() -> Iterator[None]:
    """Keep this process's INT/TERM/USR2 handlers across a call that installs its own:
    ``ray.init`` sets a SIGTERM handler that exits at once (``sys.exit``), which would turn
    a TERM into an exit with nothing saved."""
    kept = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)
