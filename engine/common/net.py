"""Network addresses given in options: a URL's port and a host that must resolve, refused in one line (UserError);
what counts as this machine's loopback, for binds and for Host headers (the view, the metrics, OPC UA)."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import SplitResult, urlsplit

from engine.common.errors import UserError

__all__ = ["url_port", "resolve", "is_loopback", "loopback_host_header", "parse_listen_address"]


def url_port(parts: SplitResult, default: int, what: str) -> int:
    """The URL's port, or `default`; `what` names the option and URL in the error ("--mqtt mqtt://...")."""
    try:
        return parts.port or default
    except ValueError:
        raise UserError(f"{what}: the port is not a number from 1 to 65535") from None


def resolve(host: str, port: int, what: str) -> None:
    """Refuse a host name that does not resolve now: bad input, before anything runs."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"{what}: cannot resolve host {host!r} ({getattr(e, 'strerror', None) or e})") from None


def is_loopback(host: str) -> bool:
    """Whether a host (a name or an address, as given in an option) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_host_header(host: str | None) -> bool:
    """Whether a request's Host header names this machine's loopback (any port): localhost, 127.0.0.0/8, [::1]."""
    if not host:
        return False
    try:
        parts = urlsplit(f"//{host}")
        name, _ = parts.hostname, parts.port  # .port raises on a port that is not a number
    except ValueError:
        return False
    if name is None or parts.netloc != host or parts.username is not None:
        return False
    return is_loopback(name[:-1] if name.endswith(".") else name)  # "localhost." is the same name, fully qualified


def parse_listen_address(text: str, option: str) -> tuple[str, int]:
    """'[HOST:]PORT' of a server option (--view, --metrics) -> (host, port); host 127.0.0.1 when omitted."""
    host, _, port = str(text).rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"{option} {text}: expected [HOST:]PORT, the port a number from 0 to 65535")
    return host, int(port)
