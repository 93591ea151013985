"""The bytes the vdisks hold in memory, and the bounds on them.

A vdisk holds the data of two kinds of blocks: those that arrived **ahead** of their turn
(out of order, up to ``--max-buffered-bytes`` per vdisk) and those received in order and
not stored yet, **pending** (up to ``--max-pending-bytes`` per vdisk: storage is behind or
down). Both count against the server's budget (``--max-server-buffered-bytes``), shared by
every vdisk. A block that would break a bound is answered RecvFailed, and resent by its
client later. `VdiskBudget` keeps one vdisk's two counts and the server's total in step: a
block moves from ahead to pending without counting twice, and what a vdisk gives up (stored,
dropped, abandoned) is given back once.
"""

from __future__ import annotations

from typing import Literal

#: Why a block is not taken: the vdisk's pending bytes are at their bound ("pending"), its
#: out-of-order bytes would pass theirs ("window"), or the server's budget is used up
#: ("server").
Refusal = Literal["pending", "window", "server"]


class ServerBudget:
    """Bytes every vdisk of a server holds together, and the bound on them."""

    __slots__ = ("used", "limit")

    def __init__(self, limit: int) -> None:
        self.used = 0
        self.limit = limit


class VdiskBudget:
    """One vdisk's ahead and pending bytes, counted against ``server`` too."""

    __slots__ = ("server", "ahead", "pending", "max_ahead", "max_pending")

    def __init__(self, server: ServerBudget, max_ahead: int, max_pending: int) -> None:
        self.server = server
        self.ahead = 0
        self.pending = 0
        self.max_ahead = max_ahead
        self.max_pending = max_pending

    # -- blocks received in order --
    def admit(self, size: int, unblocks: bool) -> Refusal | None:
        """A block of ``size`` bytes received in order: counted as pending and None, or why
        it is not taken. ``unblocks``: blocks are held ahead of it, which it may move in
        order: then the server's budget does not stop it (they are counted already)."""
        if self.pending >= self.max_pending:
            return "pending"
        server = self.server
        if not unblocks and server.used >= server.limit:
            return "server"
        self.pending += size
        server.used += size
        return None

    def to_pending(self, size: int) -> None:
        """``size`` bytes of blocks held ahead moved in order (behind an admitted one)."""
        self.ahead -= size
        self.pending += size

    def stored(self, size: int) -> None:
        """``size`` pending bytes were stored."""
        self.pending -= size
        self.server.used -= size

    # -- blocks ahead of their turn --
    def admit_ahead(self, size: int) -> Refusal | None:
        """A block of ``size`` bytes that arrived ahead of its turn: counted as held ahead
        and None, or why it is not kept."""
        if self.ahead + size > self.max_ahead:
            return "window"
        server = self.server
        if server.used + size > server.limit:
            return "server"
        self.ahead += size
        server.used += size
        return None

    def replace(self, old: int, new: int) -> None:
        """A block held ahead, of ``old`` bytes, was replaced by one of ``new`` bytes."""
        self.ahead += new - old
        self.server.used += new - old

    def drop_ahead(self) -> None:
        """Every block held ahead was dropped."""
        self.server.used -= self.ahead
        self.ahead = 0

    def release(self) -> None:
        """The vdisk was given up: everything it held is given back. What is stored later
        of its pending blocks (a round already sent) must not be counted out again."""
        self.drop_ahead()
        self.server.used -= self.pending
        self.pending = 0
