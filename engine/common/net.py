"""Network addresses given in options: a URL's port and a host that must resolve, refused in one line (UserError)."""

from __future__ import annotations

import socket
from urllib.parse import SplitResult

from engine.common.errors import UserError

__all__ = ["url_port", "resolve"]


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
