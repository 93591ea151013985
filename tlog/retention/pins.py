"""Named restore points ("pins"): a point of a vdisk's log that compaction keeps restorable
until it is unpinned.

Each storage server of the vdisk's pool holds the pins in the list ``tlog_pins_<vdisk>``,
one JSON value per pin; a reader takes the union (a pin on any server counts, so a server
that missed an unpin only keeps more history). Adding and removing need every server.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import asdict, dataclass

from tlog.storage import StorageError, StoragePool
from tlog.storage.keys import pin_list_key

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


class PinError(Exception):
    """A pin that cannot be added, found or removed; the message says why."""


@dataclass(frozen=True)
class Pin:
    """A restore point: the state once every block up to ``sequence`` of ``epoch`` is in."""

    name: str
    epoch: int
    sequence: int
    timestamp: int  # of the newest block at the point (ns), for display
    created: int  # ns

    @property
    def position(self) -> tuple[int, int]:
        return (self.epoch, self.sequence)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> Pin | None:
        """The pin in a stored value; None when it is not one (left alone)."""
        try:
            data = json.loads(value)
            return cls(str(data["name"]), int(data["epoch"]), int(data["sequence"]),
                       int(data["timestamp"]), int(data["created"]))
        except (ValueError, KeyError, TypeError):
            return None


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise PinError(f"pin name {name!r}: use 1-128 letters, digits and . _ : @ - "
                       "(starting with a letter or digit)")
    return name


async def _stored(pool: StoragePool, vdisk_id: str, every: bool) -> list[list[bytes]]:
    key = pin_list_key(vdisk_id)

    async def one(index: int) -> list[bytes] | None:
        try:
            return await pool.servers[index].list_range(key)
        except StorageError:
            if every:
                raise
            return None
    try:
        found = await asyncio.gather(*(one(i) for i in range(len(pool.servers))))
    except StorageError as exc:
        raise PinError(f"every storage server must be reachable to change pins: {exc}") from None
    if not every and sum(entries is None for entries in found) > pool.m:
        # With more than m servers silent, a pin could be on none of those that answered.
        raise PinError(f"vdisk {vdisk_id}: too many storage servers unreachable to read its "
                       "pins")
    return [entries or [] for entries in found]


async def read_pins(pool: StoragePool, vdisk_id: str, *, every: bool = False) -> list[Pin]:
    """The vdisk's pins (the union of the servers' lists), oldest position first.
    ``every``: fail unless every server answers (what compaction needs)."""
    pins: dict[bytes, Pin] = {}
    for entries in await _stored(pool, vdisk_id, every):
        for value in entries:
            pin = Pin.decode(value)
            if pin is not None:
                pins.setdefault(bytes(value), pin)
    return sorted(pins.values(), key=lambda p: (p.position, p.name))


async def add_pin(pool: StoragePool, vdisk_id: str, name: str, epoch: int, sequence: int,
                  timestamp: int) -> Pin:
    """Store a pin on every server; PinError if the name is taken."""
    check_name(name)
    if any(p.name == name for p in await read_pins(pool, vdisk_id, every=True)):
        raise PinError(f"vdisk {vdisk_id} already has a pin named {name!r} (unpin it first)")
    pin = Pin(name, epoch, sequence, timestamp, time.time_ns())
    key = pin_list_key(vdisk_id)
    try:
        await asyncio.gather(*(server.list_push(key, pin.encode()) for server in pool.servers))
    except StorageError as exc:
        raise PinError(f"storing the pin failed on some server (run again): {exc}") from None
    return pin


async def remove_pin(pool: StoragePool, vdisk_id: str, name: str) -> Pin:
    """Remove a pin from every server; PinError if there is none of that name."""
    stored = await _stored(pool, vdisk_id, True)
    values = {bytes(v) for entries in stored for v in entries
              if (p := Pin.decode(v)) is not None and p.name == name}
    if not values:
        raise PinError(f"vdisk {vdisk_id} has no pin named {name!r}")
    key = pin_list_key(vdisk_id)
    try:
        await asyncio.gather(*(server.list_remove(key, value)
                               for server in pool.servers for value in values))
    except StorageError as exc:
        raise PinError(f"removing the pin failed on some server (run again): {exc}") from None
    found = Pin.decode(next(iter(values)))
    assert found is not None
    return found
