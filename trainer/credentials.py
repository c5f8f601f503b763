"""Credentials out of what is shown or kept: URLs in messages, reports, run files and bundle provenance carry no
user, password or query (where keys travel), and an API key that no HTTP header can carry is refused by the name
of its setting, never printed (httpx put the whole header, key included, in its error)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit, urlunsplit

URL = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)
_HEADER_SAFE = re.compile(r"[!-~]+")  # printable ASCII, no space: what a bearer token may hold


def shown_url(text: str) -> str:
    """A URL without its user, password, query and fragment (where keys travel), each `***`; any other text as it
    is. Everything up to the last "@" goes, not only what `urlsplit` takes for the user: a password holding an
    unencoded "#", "/" or "?" ends the host part there, and the rest of it was shown as a fragment or a path."""
    if not URL.match(text):
        return text
    scheme, _, rest = text.partition("://")
    user = "@" in rest
    rest = rest.rpartition("@")[2]
    try:
        parts = urlsplit(f"{scheme}://{rest}")
    except ValueError:  # an unclosed IPv6 bracket: nothing of it is shown
        return f"{scheme}://***"
    netloc = f"***@{parts.netloc}" if user else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", "***" if parts.fragment else ""))


def url_problem(url: str) -> str | None:
    """Why an OpenAI-compatible base URL could never be called (None: it could), said of it without quoting it:
    refused before any model loads or any item runs, where it failed at run time, request after request."""
    if url != url.strip() or any(c.isspace() or not c.isprintable() for c in url):
        return "has whitespace or control characters in it: give the URL alone"  # urlsplit drops them silently
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is no number, or out of range, raises ValueError here
    except ValueError:  # its message quotes the URL's parts: a password's, where it holds an unencoded "/"
        return (
            "is not a valid URL (its port, or an unclosed IPv6 bracket; percent-encode '#', '/' and '?' in a user or"
            " password)"
        )
    if "@" in url.partition("://")[2] and "@" not in parts.netloc:
        return "has an '@' after its host: percent-encode '#', '/' and '?' in a user or password"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http(s) URL: give the server's base URL, http:// or https://, e.g. http://127.0.0.1:8000/v1"
    return None


def has_user(url: str) -> bool:
    """Whether a URL holds a user (and password) httpx sends as Basic authorization, also one whose password holds
    an unencoded '?' or '#' (which `urlsplit` leaves out of the host part)."""
    return url.partition("://")[2].partition("/")[0].rpartition("@")[0] not in ("", ":")  # empty: httpx sends none


def authorization_clash(url: str | None, key: str | None, url_name: str, key_name: str) -> str | None:
    """Why a key cannot go with `url` (None: it can): httpx sends a URL's user and password as Basic authorization,
    replacing the key's Bearer header, so the key was never sent and the server's 401 blamed it."""
    if not (url and key and has_user(url)):
        return None
    return (
        f"{url_name} holds a user and password and {key_name} is set: both would go in the Authorization header, the"
        " URL's replacing the key; give one of them"
    )


def url_secrets(url: str) -> list[str]:
    """What `shown_url` leaves out of a URL, to hide wherever else it shows up (a server echoing the request's path
    and query in its 404): user, password, query and each query value."""
    try:
        parts = urlsplit(url)
        values = [value for _, value in parse_qsl(parts.query)]
    except ValueError:
        return []
    return [s for s in (parts.username, parts.password, parts.query, *values) if s and len(s) >= 4]


def hidden(text: str, *secrets: str | None) -> str:
    """`text` (an error message, a server's reply) with its URLs as `shown_url` shows them and each of `secrets`
    (an API key, `url_secrets`) as `***`."""
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return _URL_IN_TEXT.sub(lambda found: shown_url(found.group()), text)


def key_problem(key: str) -> str | None:
    """What keeps `key` out of an HTTP header, described without any of its characters; None when nothing does."""
    if _HEADER_SAFE.fullmatch(key):
        return None
    if key != key.strip():
        return "has whitespace at its start or end (a newline read from a file?)"
    return "holds a space, a control character or a non-ASCII character, which no HTTP header can carry"
