"""Spare RSA keys made ahead of need, so creating a directory or mutable file does not wait for one.

A 2048-bit key takes ~50 ms of CPU (more under load) and every new directory needs one: `cp -a` of a tree would
make each mkdir wait that long. A long-running client (grid_server's node state: the grid server, or a `--no-split`
mount) runs `keep_filled` in its nursery, which keeps a few keys ready, made in a worker thread (OpenSSL releases
the GIL, so this runs beside the event loop); `take` hands one out and wakes the filler. Without the filler, `take`
makes a key on demand.
"""

from collections.abc import Callable
from typing import NoReturn

import trio
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey


class KeyPool:
    def __init__(self, make: Callable[[], RSAPrivateKey]) -> None:
        self._make = make
        self._spares: list[RSAPrivateKey] = []
        self._taken = trio.Event()

    @property
    def spare(self) -> int:
        return len(self._spares)

    async def take(self) -> RSAPrivateKey:
        """A key never handed out before: a spare if there is one, else a new one made now."""
        if self._spares:
            self._taken.set()
            return self._spares.pop()
        return await trio.to_thread.run_sync(self._make)

    async def keep_filled(self, count: int) -> NoReturn:
        """Keep `count` spare keys, forever (run it in a nursery and cancel it to stop)."""
        while True:
            while len(self._spares) < count:
                self._spares.append(await trio.to_thread.run_sync(self._make, abandon_on_cancel=True))
            self._taken = trio.Event()
            await self._taken.wait()
