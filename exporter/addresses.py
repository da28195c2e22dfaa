"""Server addresses that follow the capture interface: added, removed or renewed addresses count at once.

On Linux the kernel tells of every address change on a netlink socket (RTMGRP_IPV4_IFADDR,
RTMGRP_IPV6_IFADDR); elsewhere the addresses are read again every ``POLL_SECONDS``. After a change
they are read again (``interfaces.server_addresses``) and, if the set differs, handed on.
"""
from __future__ import annotations

import logging
import select
import socket
import sys
import threading
from typing import Callable, Optional

from .classify import ServerSet
from .interfaces import InterfaceNotFound, server_addresses

log = logging.getLogger(__name__)

POLL_SECONDS = 10.0  # without netlink
SETTLE_SECONDS = 0.1  # changes often come in bursts (an address and its routes): read once they settle
# <linux/netlink.h>, <linux/rtnetlink.h>
NETLINK_ROUTE = 0
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100


class ServerAddresses:
    """The current server set of a capture, replaced as a whole when the interface's addresses change."""

    def __init__(self, servers: ServerSet, interface: Optional[str] = None,
                 on_change: Callable[[ServerSet], None] = lambda servers: None):
        self._servers = servers
        self.interface = interface  # None: fixed addresses (--server-ip, a replay)
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def current(self) -> ServerSet:
        return self._servers

    def addresses(self) -> tuple[str, ...]:
        """The current server addresses and networks, as text."""
        return self._servers.addresses

    def start(self) -> None:
        """Follow the interface's addresses on a daemon thread (nothing to do for fixed addresses)."""
        if self.interface is None:
            return
        self._thread = threading.Thread(target=self._run, name="server-addresses", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def refresh(self) -> None:
        """Read the interface's addresses again; take them if they changed (and are not none at all)."""
        try:
            addresses = server_addresses(self.interface)
        except InterfaceNotFound:
            return  # the capture reports the interface's loss; its last addresses stay
        if not addresses or set(addresses) == set(self._servers.addresses):
            return
        added = sorted(set(addresses) - set(self._servers.addresses))
        removed = sorted(set(self._servers.addresses) - set(addresses))
        self._servers = ServerSet(addresses)
        self.on_change(self._servers)
        log.info("server addresses of %s changed: %s%s; now %s", self.interface,
                 f"added {', '.join(added)}" if added else "", f" removed {', '.join(removed)}" if removed else "",
                 ", ".join(addresses))

    def _run(self) -> None:
        listener = _address_events() if sys.platform.startswith("linux") else None
        try:
            while not self._stop.is_set():
                if listener is None:
                    if self._stop.wait(POLL_SECONDS):
                        return
                elif not select.select([listener], [], [], 0.5)[0]:
                    continue
                else:
                    self._drain(listener)
                    if self._stop.wait(SETTLE_SECONDS):
                        return
                    self._drain(listener)
                try:
                    self.refresh()
                except Exception:  # a bug must not end the watching; the next change tries again
                    log.exception("reading the server addresses of %s failed", self.interface)
        finally:
            if listener is not None:
                listener.close()

    @staticmethod
    def _drain(listener: socket.socket) -> None:
        while select.select([listener], [], [], 0)[0]:
            listener.recv(65536)


def _address_events() -> Optional[socket.socket]:
    """A netlink socket told of every address change, or None where that is not possible."""
    try:
        listener = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        listener.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        return listener
    except OSError as error:
        log.warning("cannot listen for address changes (%s): reading them every %.0f s", error, POLL_SECONDS)
        return None
