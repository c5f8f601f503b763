"""URLs as messages, logs and responses may show them: without the credentials a URL can carry."""

from __future__ import annotations

from urllib.parse import urlsplit


def without_credentials(url: str) -> tuple[str, str]:
    """(host[:port], the URL without its user and password)."""
    parts = urlsplit(url)
    name = parts.hostname or ""
    host = (f"[{name}]" if ":" in name else name) + (f":{parts.port}" if parts.port else "")  # IPv6 in brackets
    return host, f"{parts.scheme}://{host}{parts.path}"
