"""What a (re-)run does with the records already in its store: skip them, or retry the
failed ones (``run.retry_failed``, ``matrix-hpc run --retry-failed``), and the lines that
say so. The rule for which record of an id counts lives in :mod:`matrix_hpc.store.latest`.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, JobConfig
from .runtime.source import DatasetScan
from .store import StoreReader
from .store.latest import ResumeState, retry_kinds

__all__ = ["nothing_to_do", "plan_resume"]

log = logging.getLogger(__name__)

RETRY_HINT = "--retry-failed runs them again (--retry-failed KIND[,KIND] for some kinds; run.retry_failed in a config)"


def _kinds_text(state: ResumeState) -> str:
    return ", ".join(f"{k} {n}" for k, n in state.failed_by_kind.most_common())


def plan_resume(config: JobConfig, reader: StoreReader, say: Callable[[str], None], scan: DatasetScan | None = None) -> ResumeState:
    """The ids to skip and those to run again. A kind ``run.retry_failed`` names that no
    record of the store ever failed with is a config error (a typo), with a "did you mean";
    one whose records were all retried already is not (re-running the same command resumes).
    ``scan`` (with ids): the id hashes two rows of the dataset share are compared as text."""
    try:
        kinds = retry_kinds(config.run.retry_failed)
    except ValueError as exc:
        raise ConfigError(f"run.retry_failed: {exc}") from None
    state = reader.resume_state(kinds, scan.ids.repeated if scan is not None and scan.ids is not None else ())
    unknown = sorted((kinds or frozenset()) - state.kinds_seen)
    if unknown and reader.parts:
        close = difflib.get_close_matches(unknown[0], sorted(state.kinds_seen), n=1, cutoff=0.6)
        seen = f"its failures: {_kinds_text(state)}" if state.failed else "it holds no failed record"
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"run.retry_failed: no record of {reader.root} failed as {unknown[0]!r} ({seen}){hint}")
    if state.retry:
        what = "failed record(s)" if not kinds else f"record(s) failed as {' or '.join(sorted(kinds))}"
        say(f"retrying {len(state.retry)} {what}: each new record replaces its failed one (kept in the store's history)")
    return state


def nothing_to_do(root: Path, state: ResumeState, retrying: bool) -> str:
    """The line of a run that finds every row of its dataset in the store: what to do next."""
    line = f"nothing to do: every row of the dataset is already in {root}"
    if state.failed and not retrying:
        return f"{line}; {state.failed} of them failed ({_kinds_text(state)}): {RETRY_HINT}"
    if retrying:
        left = f" (failed now: {_kinds_text(state)})" if state.failed else ""
        return f"{line}, and no failed record is left to retry{left}"
    return line
