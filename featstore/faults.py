"""Test-only fault injection: kill this process at a named point of extraction.

The reliability suite (bench/kill_extract.py, tests/pipelines/test_kill_extract.py) must kill
an extraction *exactly* between two steps (e.g. after a shard's data is written but before its
done marker), which a timer cannot hit reliably. Code calls ``fault_point("name")`` at such
points; it is a no-op unless the environment variable ``FEATCACHE_FAULT`` is set, so production
runs pay one dictionary lookup.

``FEATCACHE_FAULT=<point>:<n>`` sends SIGKILL to the current process the n-th time (1-based)
``<point>`` is reached in this process. Several specs may be given, comma-separated. A worker
process (dask, DataLoader) reads the variable from its own environment, so the count is per
process.
"""

from __future__ import annotations

import os
import signal

from featstore.errors import FeatcacheError

FAULT_ENV = "FEATCACHE_FAULT"

# Times each point has been reached in this process.
_hits: dict[str, int] = {}


class FaultSpecError(FeatcacheError, ValueError):
    """``FEATCACHE_FAULT`` is not of the form ``<point>:<n>[,<point>:<n>...]``."""


def parse_fault_spec(text: str) -> dict[str, int]:
    """Map point name -> the hit count at which to kill, from ``"a:2,b:1"``."""
    targets: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, count = item.rpartition(":")
        if not sep or not name or not count.isdigit() or int(count) < 1:
            raise FaultSpecError(
                f"{FAULT_ENV}={text!r}: expected '<point>:<n>' with n >= 1 (e.g. "
                f"'shard.after_data:2'); unset {FAULT_ENV} to run without fault injection."
            )
        targets[name] = int(count)
    return targets


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL if ``FEATCACHE_FAULT`` targets this hit of ``name``."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if parse_fault_spec(spec).get(name) == _hits[name]:
        os.kill(os.getpid(), signal.SIGKILL)


def reset_fault_counts() -> None:
    """Forget the hit counts (tests that call ``fault_point`` in-process)."""
    _hits.clear()


__all__ = ["FAULT_ENV", "FaultSpecError", "fault_point", "parse_fault_spec", "reset_fault_counts"]
