"""URLs as messages, logs and responses may show them (without the credentials a URL can carry), and which remote
image URLs and addresses the operator's RLAIFV_ALLOWED_IMAGE_HOSTS lets the server fetch.

An allowed *name* says nothing about where it points: a wildcard over names anyone can register (`*.ngrok.app`),
or any name whose DNS a caller controls, can point at 169.254.169.254 (cloud credentials), 127.0.0.1 or a cluster
address. So every address a name resolves to must be globally routable, unless an IP or CIDR entry covers it, or
`RLAIFV_ALLOW_PRIVATE_IMAGE_ADDRESSES` opens the private ranges (an in-cluster image store). Loopback,
link-local and cloud metadata addresses need an IP or CIDR entry even then: no image store lives there, while
the server's own ports and the cloud's credential endpoints do.
"""

from __future__ import annotations

import functools
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from urllib.parse import urlsplit

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

DEFAULT_PORTS = {"http": 80, "https": 443}


def without_credentials(url: str) -> tuple[str, str]:
    """(host[:port], the URL without its user and password). Everything up to the last "@" is the user part: a
    password holding an unencoded "#", "/" or "?" ends `urlsplit`'s host part there, and its rest was shown."""
    scheme, sep, rest = url.partition("://")
    parts = urlsplit(f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url)
    name = parts.hostname or ""
    host = (f"[{name}]" if ":" in name else name) + (f":{parts.port}" if parts.port else "")  # IPv6 in brackets
    return host, f"{parts.scheme}://{host}{parts.path}"


@functools.lru_cache(maxsize=1024)
def _entry(entry: str) -> tuple[str, str | None]:
    """An allowed-hosts entry as (host, port): `host`, `*.domain`, `host:8080`, `host:*`, `[::1]:8080`, `10.0.0.0/8`,
    `[fd00::/8]:*`."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    host, colon, port = entry.rpartition(":")
    if colon and host and ":" not in host and (port.isdigit() or port == "*"):
        return host, port
    return entry, None


def entry_problem(entry: str) -> str | None:
    """What is wrong with an allowed-hosts entry, None if nothing: a URL, a bad port or CIDR network matched no
    host at all, so a typo silently refused every image of that host (or `/33` allowed nothing)."""
    text = entry.strip()
    if "://" in text or text.startswith("/"):
        return f"'{entry}' is a URL: list the host alone ('images.example.com', 'images.example.com:8080')"
    if text.startswith("[") and "]" not in text:
        return f"'{entry}' has no ']': write IPv6 entries as '[fd00::1]' or '[fd00::/8]:8080'"
    host, port = _entry(text)
    if port is None and host.count(":") == 1:
        port = host.partition(":")[2]
    if port is not None and port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
        return f"'{entry}' has port '{port}', not a number from 1 to 65535 or '*'"
    if "/" in host or ":" in host or text.startswith("["):
        if _network(host) is None:
            return f"'{entry}' is not an IP address or CIDR network ('10.0.0.0/8', '[fd00::/8]:*')"
        return None
    name = host[2:] if host.startswith("*.") else host
    labels = name.rstrip(".").split(".")
    if not name or any(not label or not all(c.isalnum() or c in "-_" for c in label) for label in labels):
        return f"'{entry}' is not a host name ('images.example.com', '*.example.com', 'host:8080', 'host:*')"
    return None


def as_address(host: str) -> Address | None:
    """`host` as an IP address, None for a name."""
    try:
        return ip_address(host.strip("[]"))
    except ValueError:
        return None


@functools.lru_cache(maxsize=1024)
def _network(name: str) -> Network | None:
    """An entry's host as an IP network (an address is a /32 or /128), None for a name."""
    try:
        return ip_network(name, strict=False)
    except ValueError:
        return None


def _names(host: str, name: str) -> bool:
    """`name` (an entry's host: exact, `*.domain` for its subdomains, an IP address or CIDR network) names `host`.
    An IP literal is named by IP and CIDR entries only (`*.0.1` named 10.0.0.1)."""
    host, name = host.lower().rstrip("."), name.rstrip(".")
    network, address = _network(name), as_address(host)
    if network is not None or address is not None:
        return network is not None and address is not None and address in network
    return host == name or (name.startswith("*.") and host.endswith(name[1:]))


def _port_allowed(entry_port: str | None, port: int | None, scheme: str) -> bool:
    """An entry without a port allows the scheme's default port only: any port of an allowed host was fetched, a
    redirect could move to another, and the errors told open ports from closed ones."""
    port = port if port is not None else DEFAULT_PORTS.get(scheme)
    if entry_port == "*" or (entry_port is None and port == DEFAULT_PORTS.get(scheme)):
        return True
    return entry_port is not None and entry_port.isdigit() and port == int(entry_port)


def host_listed(host: str, allowed: list[str]) -> bool:
    """Some entry names `host`, on whatever port."""
    return any(_names(host, _entry(entry)[0]) for entry in allowed)


def _specificity(name: str) -> tuple[int, int]:
    """Sorts an entry's host before less specific ones: an exact name or address, then the longest wildcard (for a
    network, the longest prefix)."""
    network = _network(name.rstrip("."))
    if network is not None:
        return 0, -network.prefixlen
    return (1, -len(name)) if name.startswith("*.") else (0, 0)


def allowing_entry(url: str, allowed: list[str]) -> str | None:
    """The entry that allows `url` (its host, on its port or the scheme's own), the most specific where several do
    (`images.example.com` before `*.example.com`); None if none does. Image host lookups are capped per entry, so
    that names under one wildcard cannot take the lookups of the other entries' hosts."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        return None
    host, port = parts.hostname or "", parts.port
    matching = [
        (_specificity(name), entry.strip())
        for entry in allowed
        for name, entry_port in [_entry(entry)]
        if _names(host, name) and _port_allowed(entry_port, port, scheme)
    ]
    return min(matching)[1] if matching else None


def url_allowed(url: str, allowed: list[str]) -> bool:
    return allowing_entry(url, allowed) is not None


def _nets(kind: str, *networks: str) -> list[tuple[Network, str]]:
    return [(ip_network(n), kind) for n in networks]


# Well-known cloud metadata and credential endpoints: AWS (IMDS, ECS, EKS Pod Identity), GCP, Azure, Oracle,
# DigitalOcean (169.254.169.254 and fd20:ce::254), Alibaba (100.100.100.200), Azure WireServer (168.63.129.16).
_METADATA = _nets(
    "cloud metadata",
    "169.254.169.254/32",
    "169.254.170.2/32",
    "169.254.170.23/32",
    "100.100.100.200/32",
    "168.63.129.16/32",
    "fd00:ec2::254/128",
    "fd00:ec2::23/128",
    "fd20:ce::254/128",
)
# Checked in order, after the metadata endpoints; Python's own `is_global` missed multicast, 192.0.0.0/24 and
# IPv4-mapped forms in 3.11, so the IANA special-purpose ranges are listed here.
_KINDS: list[tuple[Network, str]] = [
    *_METADATA,
    *_nets("unspecified", "0.0.0.0/8", "::/128"),
    *_nets("loopback", "127.0.0.0/8", "::1/128"),
    *_nets("link-local", "169.254.0.0/16", "fe80::/10"),
    *_nets("private", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"),
    *_nets("shared (CGNAT)", "100.64.0.0/10"),
    *_nets("multicast", "224.0.0.0/4", "ff00::/8"),
    *_nets(
        "reserved",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "240.0.0.0/4",
        "::/96",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "3fff::/20",
        "5f00::/16",
        "fec0::/10",
    ),
]
_GLOBAL_UNICAST_V6 = ip_network("2000::/3")
_NAT64 = ip_network("64:ff9b::/96")
OPENED_BY_SETTING = frozenset({"private", "shared (CGNAT)"})


def _embedded_v4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 one carries to (IPv4-mapped, NAT64, 6to4): where the connection lands."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def address_kind(address: Address) -> str | None:
    """None for a globally routable address, else what it is: 'loopback', 'private', 'cloud metadata', ...; an
    IPv6 form of an IPv4 address is what that address is."""
    if isinstance(address, IPv6Address):
        embedded = _embedded_v4(address)
        if embedded is not None:
            return address_kind(embedded)
    for network, kind in _KINDS:
        if address in network:
            return kind
    if isinstance(address, IPv6Address) and address not in _GLOBAL_UNICAST_V6:
        return "reserved"
    return None if address.is_global else "reserved"


def address_allowed(address: Address, allowed: list[str], port: int, scheme: str) -> bool:
    """An IP or CIDR entry covers `address` (or the IPv4 address it carries) on `port`."""
    candidates: list[Address] = [address]
    if isinstance(address, IPv6Address) and (embedded := _embedded_v4(address)) is not None:
        candidates.append(embedded)
    for name, entry_port in map(_entry, allowed):
        network = _network(name.rstrip("."))
        if network is not None and any(a in network for a in candidates) and _port_allowed(entry_port, port, scheme):
            return True
    return False


def _entry_for(address: Address, port: int, scheme: str) -> str:
    text = str(address)
    if port == DEFAULT_PORTS.get(scheme):
        return text
    return f"[{text}]:{port}" if address.version == 6 else f"{text}:{port}"


def address_refusal(
    host: str, address: Address, port: int, scheme: str, allowed: list[str], *, private_allowed: bool = False
) -> str | None:
    """Why the server may not connect to `address` (of `host`, the URL's host) on `port`; None if it may."""
    kind = address_kind(address)
    if kind is None or address_allowed(address, allowed, port, scheme):
        return None
    if private_allowed and kind in OPENED_BY_SETTING:
        return None
    what = (
        f"is a non-public address ({kind})"
        if as_address(host) is not None
        else f"resolves to a non-public address ({address}, {kind})"
    )
    how = f"the server's operator can allow it with an entry '{_entry_for(address, port, scheme)}' (or a CIDR"
    how += " network holding it) in RLAIFV_ALLOWED_IMAGE_HOSTS"
    if kind in OPENED_BY_SETTING:
        how += ", or private addresses for every allowed name with RLAIFV_ALLOW_PRIVATE_IMAGE_ADDRESSES=true"
    return f"image host '{host}' {what}; {how}"
