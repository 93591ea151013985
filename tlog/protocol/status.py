"""Status codes of the tlog protocol, with the reference's numeric values."""

from __future__ import annotations

import enum


class BlockStatus(enum.IntEnum):
    """`TlogResponse.status`: what happened to the listed sequences."""

    #: Ours: WaitNbdSlaveSync could not be honoured (no standby, or it is not in step
    #: within the server's timeout). The reference has no failure answer.
    WAIT_NBD_SLAVE_SYNC_FAILED = -3
    FLUSH_FAILED = -2
    RECV_FAILED = -1
    RECV_OK = 1
    FLUSH_OK = 2
    FORCE_FLUSH_RECEIVED = 3
    WAIT_NBD_SLAVE_SYNC_RECEIVED = 4

    @property
    def is_error(self) -> bool:
        return self < 0


class HandshakeStatus(enum.IntEnum):
    """`HandshakeResponse.status`: negative values are errors.

    -4..1 are the reference's. UNAUTHORIZED is ours: -6, because later 0-Disk releases
    gave -5 to "attach failed". A 0-Disk Go client treats any status <= 0 as an error and
    reports an unknown one as "invalid connection with unknown status: -6".
    """

    #: Ours: another tlogserver of the fleet owns the vdisk (its etcd lease); try the next.
    NOT_OWNER = -7
    UNAUTHORIZED = -6
    INTERNAL_SERVER_ERROR = -4
    INVALID_VDISK_ID = -3
    INVALID_VERSION = -2
    INVALID_REQUEST = -1
    OK = 1

    @property
    def is_error(self) -> bool:
        return self < 0


class Operation(enum.IntEnum):
    """`TlogBlock.operation`: what the block does to its index."""

    SET = 1
    DELETE = 2
    #: Ours: the blocks ``[index, index + count)`` deleted (a trim or a zero of a range), the
    #: count in the data (`tlog.protocol.ranges`). One entry, one sequence. Sent only to a
    #: server that says it takes them (HandshakeResponse.rangeOps).
    DELETE_RANGE = 3


class MessageType(enum.IntEnum):
    """The byte in front of every client message after the handshake."""

    TLOG_BLOCK = 1
    FORCE_FLUSH_AT_SEQ = 2
    WAIT_NBD_SLAVE_SYNC = 3
