"""Whether the Hugging Face hub can be reached, decided quickly.

The hub libraries retry an unreachable endpoint for half a minute; models (`models.load_model`)
and corpora (`corpus.hub_dataset`) ask here first, once, and fall back to the local cache or fail
with a clear message at once.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
TRUE = ("1", "on", "yes", "true")


def hub_offline(datasets: bool = False) -> bool:
    """True when the user said so: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE, or for `datasets`
    HF_DATASETS_OFFLINE) is set to a true value; the hub libraries then read their cache only."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") + (("HF_DATASETS_OFFLINE",) if datasets else ())
    return any(os.environ.get(name, "").strip().lower() in TRUE for name in names)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint ($HF_ENDPOINT, else huggingface.co), name lookup
    included, bounded by `timeout` seconds in all; False at once when `hub_offline()`."""
    if hub_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    if not url.hostname:
        return False
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
    except ValueError:  # a malformed port in HF_ENDPOINT
        return False
    reached: list[bool] = []

    def connect() -> None:  # a thread, so that a hanging name lookup is bounded by `timeout` too
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, name="hub-reachable", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached)
