"""Raw-socket client helpers shared by the `opdistill serve` tests (test_serve.py, test_serve_limits.py)."""

from __future__ import annotations

import socket


def read_until_closed(sock: socket.socket, wait: float = 10.0) -> bytes:
    """Everything the server sends on `sock` until it closes the connection (or resets it, or `wait` passes)."""
    sock.settimeout(wait)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received
