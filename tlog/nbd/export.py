"""Opening an export: its backend, its state, its tlog client, and the device and the log
brought into agreement (`tlog.nbd.convergence`) before anything is served."""

from __future__ import annotations

import contextlib
import logging
import time

from tlog.client import ThreadedClient, TlogClientError, security_options

from .backend import Backend, BackendError
from .convergence import ExportRefused, recover, verdict
from .disk import LoggedDisk
from .intent import ExportState, IntentError, IntentLog, boot_id
from .settings import NbdSettings, open_backend, open_standby

log = logging.getLogger("tlog.nbd")

#: Seconds a recovery may wait for the log (to take each step, and to store all of it).
RECOVERY_TIMEOUT = 300.0
#: The log lines of `tlog nbd` and of its plugin.
LOG_FORMAT = "tlog nbd: %(levelname)s %(name)s: %(message)s"


def connect(settings: NbdSettings) -> ThreadedClient:
    """The tlog client of the export, continuing the vdisk's log where it ends."""
    security = security_options(tls=settings.tls, ca_file=settings.tls_ca or None,
                                cert_file=settings.tls_cert or None,
                                key_file=settings.tls_key or None,
                                token_file=settings.token_file or None)
    return ThreadedClient(settings.servers, settings.vdisk, None,
                          connect_timeout=settings.connect_timeout, **security)


def open_disk(settings: NbdSettings) -> LoggedDisk:
    """The export, ready to serve: the backend opened and, unless read-only, the tlog client
    connected and the device brought into agreement with the log (a recovery after an
    unclean stop). Raises `ExportRefused`, BackendError, IntentError or the client's
    errors, each with a message for the operator."""
    settings.check()
    backend = open_backend(settings)
    size = settings.size or backend.size
    if size % settings.block_size:
        backend.close()
        raise BackendError(f"{backend.describe()}: its size {size} is not a multiple of the "
                           f"block size {settings.block_size} (give --size)")
    standby = None
    if settings.standby:
        def standby() -> Backend:
            return open_standby(settings, size)

    def disk(client: ThreadedClient | None, intent: IntentLog | None = None,
             state: ExportState | None = None) -> LoggedDisk:
        return LoggedDisk(backend, size, client, vdisk=settings.vdisk,
                          write_timeout=settings.write_timeout,
                          flush_timeout=settings.flush_timeout, standby=standby,
                          failover_timeout=settings.failover_timeout, intent=intent,
                          state=state, checkpoint_bytes=settings.checkpoint_bytes)

    if settings.readonly:
        return disk(None)
    intent: IntentLog | None = None
    client: ThreadedClient | None = None
    try:
        intent = backend.intent_log(settings.state_file or None)
        client = connect(settings)
        return disk(client, intent, converge(settings, backend, intent, client, size))
    except BaseException:
        if client is not None:
            client.close()
        if intent is not None:
            with contextlib.suppress(Exception):
                intent.close()
        backend.close()
        raise


def prepare(settings: NbdSettings) -> None:
    """What `tlog nbd` does before it starts nbdkit: open the export (a recovery if it
    must) and stop it cleanly, so that a refusal is one line from the command, and the
    plugin then starts on a device that agrees with the log."""
    open_disk(settings).close(quiet=True)


def converge(settings: NbdSettings, backend: Backend, intent: IntentLog,
             client: ThreadedClient, size: int) -> ExportState:
    """Check the device's state against the log's position and recover if it must; the
    state of the running export (saved: not clean, this boot), positioned at the log."""
    vdisk = settings.vdisk
    state = intent.load()
    kind = verdict(state, client.log_position, vdisk, backend.describe(),
                   adopt=settings.adopt)
    if kind == "recover":
        assert state is not None
        state.recovering = True
        intent.save(state)  # before the new epoch: the log may then be one epoch further

        def new_epoch() -> int:
            try:
                return client.new_epoch(settings.connect_timeout)
            except (TlogClientError, TimeoutError, ConnectionError) as exc:
                raise ExportRefused(f"vdisk {vdisk}: cannot start a new epoch to recover "
                                    f"in: {exc}") from None
        done = recover(backend, intent, client, state, timeout=RECOVERY_TIMEOUT,
                       new_epoch=new_epoch)
        state.recovering = False
        state.recoveries += 1
        state.last_recovery = {"time": time.time(), "blocks": done.blocks,
                               "logged": done.logged + done.deleted, "seconds": done.seconds}
        log.warning("%s", done.line(vdisk, state))
    elif kind in ("fresh", "adopt"):
        state = ExportState(vdisk, settings.block_size, size)
        if kind == "adopt":
            log.warning("vdisk %s: %s adopted as the log is now (--adopt): no check could "
                        "be made", vdisk, backend.describe())
    else:
        assert state is not None
        log.info("vdisk %s: clean start, device and log agree at %s (no recovery)", vdisk,
                 state.describe())
    state.epoch, state.sequence = client.epoch, client.next_sequence - 1
    state.block_size, state.size = settings.block_size, size
    state.clean = False
    state.boot_id = boot_id()
    try:
        intent.save(state)
    except IntentError as exc:
        raise ExportRefused(str(exc)) from None
    return state
