"""Is the model hub reachable? One short probe, so offline pretrained tags fail in seconds.

huggingface_hub retries an unreachable host for about 50 s per file before giving up. Teachers
(``pipelines``) and the student (``trainer``) both ask here first; it lives in the base layer
because neither may import the other. Standard library only (the layering test holds featstore
to that); ``huggingface_hub`` is touched lazily and only to force its offline mode.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "on", "yes", "true"}


def _offline_env() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    return None


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.lru_cache(maxsize=8)
def _probe(host: str, port: int, timeout: float) -> str | None:
    """Connect once; None when it works, else why not. Cached: one probe per process."""
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as err:
            outcome.append(f"{host}:{port} is unreachable ({err})")

    # The connect timeout does not cover name resolution, which can hang for tens of seconds
    # on a machine without a resolver; a daemon thread bounds the whole probe.
    worker = threading.Thread(target=connect, daemon=True, name="featcache-hub-probe")
    worker.start()
    worker.join(timeout)
    if not outcome:
        return f"{host}:{port} did not answer within {timeout:g} s"
    return outcome[0]


def hub_offline_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used now (``HF_HUB_OFFLINE``, failed probe), or None when it can."""
    return _offline_env() or _probe(*_endpoint(), timeout)


@contextlib.contextmanager
def forced_offline() -> Iterator[None]:
    """huggingface_hub in offline mode: files in the local cache load, missing ones fail at once.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once at import, so the constant is switched here.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def hub_access() -> Iterator[str | None]:
    """Context for a library download: yields None online, else the reason it is offline.

    Offline, the library runs in huggingface_hub's offline mode, so a cached checkpoint still
    loads and a missing one fails at once instead of after minutes of retries.
    """
    reason = hub_offline_reason()
    if reason is None:
        yield None
        return
    with forced_offline():
        yield reason
