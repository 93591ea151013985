"""The byte budget on its own (`tlogserver.budget`): a vdisk's ahead and pending bytes and
the server's total stay in step through every move, each bound refuses with its reason and
counts nothing then, and a vdisk given up returns what it held once. Inside the server the
same accounting is checked by tests/test_hostile.py and tests/test_reliability.py."""

from __future__ import annotations

from tlogserver.budget import ServerBudget, VdiskBudget

KIB = 1024


def test_blocks_move_from_ahead_to_pending_without_counting_twice() -> None:
    server = ServerBudget(1 << 30)
    vdisk = VdiskBudget(server, max_ahead=64 * KIB, max_pending=64 * KIB)
    assert vdisk.admit_ahead(4 * KIB) is None  # sequences 1 and 2 arrive before 0
    assert vdisk.admit_ahead(4 * KIB) is None
    assert (vdisk.ahead, vdisk.pending, server.used) == (8 * KIB, 0, 8 * KIB)
    assert vdisk.admit(4 * KIB, unblocks=True) is None  # 0 arrives...
    vdisk.to_pending(8 * KIB)  # ...and 0, 1 and 2 are in order
    assert (vdisk.ahead, vdisk.pending, server.used) == (0, 12 * KIB, 12 * KIB)
    vdisk.stored(12 * KIB)
    assert (vdisk.ahead, vdisk.pending, server.used) == (0, 0, 0)


def test_a_replaced_block_counts_its_new_size() -> None:
    server = ServerBudget(1 << 30)
    vdisk = VdiskBudget(server, max_ahead=64 * KIB, max_pending=64 * KIB)
    assert vdisk.admit_ahead(4 * KIB) is None
    vdisk.replace(4 * KIB, 0)  # a delete (no data) sent in its place
    assert (vdisk.ahead, server.used) == (0, 0)
    vdisk.replace(0, 2 * KIB)
    assert (vdisk.ahead, server.used) == (2 * KIB, 2 * KIB)


def test_every_bound_refuses_with_its_reason_and_counts_nothing() -> None:
    server = ServerBudget(20 * KIB)
    vdisk = VdiskBudget(server, max_ahead=8 * KIB, max_pending=12 * KIB)
    assert vdisk.admit_ahead(8 * KIB + 1) == "window"
    assert vdisk.admit_ahead(8 * KIB) is None
    assert vdisk.admit_ahead(1) == "window"
    assert vdisk.admit(12 * KIB, unblocks=False) is None
    assert vdisk.admit(1, unblocks=False) == "pending"
    assert vdisk.admit(1, unblocks=True) == "pending"  # storage behind: whatever it frees
    assert (vdisk.ahead, vdisk.pending, server.used) == (8 * KIB, 12 * KIB, 20 * KIB)
    vdisk.stored(8 * KIB)
    other = VdiskBudget(server, max_ahead=64 * KIB, max_pending=64 * KIB)
    assert other.admit_ahead(8 * KIB) is None  # the server's 20 KiB, used by the two vdisks
    assert server.used == 20 * KIB
    assert other.admit_ahead(1) == "server"
    assert other.admit_ahead(0) is None  # a block without data (a delete) takes no room
    assert vdisk.admit(1, unblocks=False) == "server"
    assert server.used == 20 * KIB
    # A block that moves blocks held ahead in order is taken: it frees the window.
    assert other.admit(1, unblocks=True) is None
    assert server.used == 20 * KIB + 1


def test_a_vdisk_given_up_returns_everything_once() -> None:
    server = ServerBudget(1 << 30)
    kept = VdiskBudget(server, max_ahead=64 * KIB, max_pending=64 * KIB)
    assert kept.admit(4 * KIB, unblocks=False) is None
    given_up = VdiskBudget(server, max_ahead=64 * KIB, max_pending=64 * KIB)
    assert given_up.admit(8 * KIB, unblocks=False) is None
    assert given_up.admit_ahead(4 * KIB) is None
    assert server.used == 16 * KIB
    given_up.release()
    assert (given_up.ahead, given_up.pending, server.used) == (0, 0, 4 * KIB)
    given_up.drop_ahead()  # nothing more to give back
    assert server.used == 4 * KIB


def test_bounds_changed_on_reload_apply_to_the_next_block() -> None:
    server = ServerBudget(1 << 30)
    vdisk = VdiskBudget(server, max_ahead=64 * KIB, max_pending=64 * KIB)
    assert vdisk.admit_ahead(16 * KIB) is None
    vdisk.max_ahead = 16 * KIB
    assert vdisk.admit_ahead(1) == "window"
    server.limit = 16 * KIB
    assert vdisk.admit(1, unblocks=False) == "server"
    vdisk.max_pending = 0
    assert vdisk.admit(1, unblocks=True) == "pending"
