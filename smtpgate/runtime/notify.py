"""systemd notification (sd_notify) without libsystemd: READY=1, RELOADING=1, STOPPING=1."""

from __future__ import annotations

import os
import socket


def sd_notify(state: str) -> bool:
    """Send state to $NOTIFY_SOCKET; False when not running under systemd Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True
