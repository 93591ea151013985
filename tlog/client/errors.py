"""What a client raises: a closed client, and one exception per refused handshake."""

from __future__ import annotations

from tlog.protocol.status import HandshakeStatus

# -- errors ----------------------------------------------------------------------------


class TlogClientError(Exception):
    """Base of the client's errors."""


class ClientClosedError(TlogClientError):
    """The client was closed; nothing more can be sent or awaited."""


class SlaveSyncError(TlogClientError):
    """The server answered WaitNbdSlaveSync with a failure (ours, status -3): the vdisk has
    no standby, or the standby was not in step within the server's timeout. The server's
    log says which; the standby must not be switched to."""


class HandshakeError(TlogClientError):
    """The server refused the handshake with a negative (or unknown) status."""

    #: Whether retrying with the same request cannot help.
    permanent = False

    def __init__(self, status: int, address: str = "") -> None:
        self.status = status
        self.address = address
        # A number, or the member: compiled code hands statuses out as plain ints.
        try:
            name = HandshakeStatus(status).name
        except ValueError:
            name = str(status)  # a status from a newer server
        where = f" by {address}" if address else ""
        super().__init__(f"handshake refused{where}: {name}")


class InvalidRequestError(HandshakeError):
    """HandshakeStatus InvalidRequest: the server could not decode the handshake."""

    permanent = True


class InvalidVersionError(HandshakeError):
    """HandshakeStatus InvalidVersion: the server does not support our protocol version."""

    permanent = True


class InvalidVdiskIDError(HandshakeError):
    """HandshakeStatus InvalidVdiskID: the server does not accept this vdisk id."""

    permanent = True


class InternalServerError(HandshakeError):
    """HandshakeStatus InternalServerError: transient (e.g. storage down); retried."""


class UnauthorizedError(HandshakeError):
    """HandshakeStatus Unauthorized (ours, -6): no or a wrong token, or a client certificate
    not allowed for this vdisk. Not retried: the same credentials would be refused again."""

    permanent = True


class NotOwnerError(HandshakeError):
    """HandshakeStatus NotOwner (ours, -7): another tlogserver owns the vdisk (an etcd
    lease); transient: the client tries its next server, and this one again later."""


_HANDSHAKE_ERRORS: dict[int, type[HandshakeError]] = {
    HandshakeStatus.NOT_OWNER: NotOwnerError,
    HandshakeStatus.UNAUTHORIZED: UnauthorizedError,
    HandshakeStatus.INVALID_REQUEST: InvalidRequestError,
    HandshakeStatus.INVALID_VERSION: InvalidVersionError,
    HandshakeStatus.INVALID_VDISK_ID: InvalidVdiskIDError,
    HandshakeStatus.INTERNAL_SERVER_ERROR: InternalServerError,
}


def handshake_error(status: int, address: str = "") -> HandshakeError:
    """The typed exception for a handshake status other than OK."""
    return _HANDSHAKE_ERRORS.get(int(status), HandshakeError)(status, address)
