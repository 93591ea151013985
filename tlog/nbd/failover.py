"""The standby taking over as the vdisk's device, in a running export (its backend failed)
or at start (its backend cannot be opened): the same steps either way (docs/nbd.md,
"Failover to the standby")."""

from __future__ import annotations

import time
from collections.abc import Callable

from tlog.client import ThreadedClient
from tlog.protocol import Operation

from .backend import Backend
from .intent import ExportState, IntentLog, boot_id


def promote(standby: Backend, client: ThreadedClient, state: ExportState, *,
            timeout: float, clock: Callable[[], int] = time.time_ns) -> IntentLog:
    """Make ``standby`` the vdisk's device, once the tlogserver has confirmed that it holds
    every logged write (WaitNbdSlaveSync: slave sync of the vdisk has ended). The log goes
    into a new epoch, made to last (an epoch none of whose blocks is stored leaves no trace)
    by logging again block 0 as the standby holds it; the export's ``state`` moves onto the
    standby, clean of marks (it holds exactly the log). The device that failed keeps a state
    of the older epoch: it never agrees with the log again (`tlog.nbd.convergence`).
    Returns the standby's intent log."""
    epoch = client.new_epoch(timeout)
    block = standby.read(0, 1)
    if block == bytes(len(block)):
        client.send_many(Operation.DELETE, 0, [b""], clock(), timeout=timeout)
    else:
        client.send_many(Operation.SET, 0, [block], clock(), timeout=timeout)
    client.wait_flushed(None, timeout=timeout)
    intent = standby.intent_log()
    state.epoch, state.sequence = epoch, client.next_sequence - 1
    state.clean = False
    state.boot_id = boot_id()
    intent.clear()
    intent.save(state)
    return intent
