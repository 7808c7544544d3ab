"""Whether the Hugging Face hub can be asked at all, so that offline loads fail in a second, not minutes."""

from __future__ import annotations


def hub_resolves() -> bool:
    """False when the hub's host name does not resolve (no network): then only the local cache can answer,
    and asking the hub would spend ~20 s of retries per file. True under ``HF_HUB_OFFLINE=1``, where
    huggingface_hub itself answers from the cache without retrying."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True
