"""Whether a download can work at all, asked before torch or torchvision is imported to try it.

A machine with no internet (or behind a package mirror) fails a download only after importing torch
and waiting for DNS: 5-19 s before a one-line refusal. One connection attempt, a few seconds at
most, answers first; its answer is kept for the process.
"""

from __future__ import annotations

import logging
import socket
import threading
from functools import cache
from urllib.parse import urlsplit

from tlfeat import config

log = logging.getLogger(__name__)

PROBE_URL = "https://download.pytorch.org"  # where torchvision's weights come from
TIMEOUT = 3.0


HF_HUB_URL = "https://huggingface.co"  # where `hf-hub:` weights (timm, open_clip, transformers) come from


def http_url(url: str) -> str:
    """The address a download of `url` connects to (`hf-hub:org/name` is Hugging Face's hub)."""
    return HF_HUB_URL if url.startswith("hf-hub:") else url


def host(url: str) -> str:
    return urlsplit(http_url(url)).hostname or url


def can_download(url: str = PROBE_URL) -> bool:
    """Downloads allowed (not TLFEAT_OFFLINE) and `url`'s host reachable."""
    return not config.offline() and reachable(http_url(url))


@cache
def reachable(url: str) -> bool:
    """Can a TCP connection to `url`'s host be opened within TIMEOUT seconds (DNS lookup included)?"""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=TIMEOUT):
                result.append(True)
        except OSError as exc:
            log.info("%s is unreachable (%s): not downloading", host, exc)

    # A resolver that hangs is not bounded by the socket timeout: wait for the attempt in a thread.
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(TIMEOUT + 0.5)
    return bool(result)
