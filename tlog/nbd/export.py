"""Opening an export: its backend, its state, its tlog client, and the device and the log
brought into agreement (`tlog.nbd.convergence`) before anything is served."""

from __future__ import annotations

import contextlib
import logging
import time

from tlog.client import ThreadedClient, TlogClientError, security_options

from .backend import Backend, BackendError
from .convergence import ExportRefused, log_position, recover, verdict
from .disk import LoggedDisk
from .failover import promote
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
    # range_ops: a trim or zero is one entry of the log where the server takes ranges
    return ThreadedClient(settings.servers, settings.vdisk, None,
                          connect_timeout=settings.connect_timeout, range_ops=True,
                          **security)


def open_disk(settings: NbdSettings) -> LoggedDisk:
    """The export, ready to serve: the backend opened and, unless read-only, the tlog client
    connected and the device brought into agreement with the log (a recovery after an
    unclean stop). With a standby: a standby the vdisk failed over to before is the device
    now; a backend that cannot be opened is failed over from at once; a standby the
    tlogserver does not keep in step is refused. Raises `ExportRefused`, BackendError,
    IntentError or the client's errors, each with a message for the operator."""
    settings.check()
    if settings.readonly:
        backend = open_backend(settings)
        return LoggedDisk(backend, settings.size or backend.size, None, vdisk=settings.vdisk,
                          write_timeout=settings.write_timeout,
                          flush_timeout=settings.flush_timeout)
    owned: list[Backend] = []  # closed if the export cannot be opened
    client: ThreadedClient | None = None
    intent: IntentLog | None = None
    try:
        backend, standby_left, client = _device(settings, owned)
        size = settings.size or backend.size
        if size % settings.block_size:
            raise BackendError(f"{backend.describe()}: its size {size} is not a multiple of "
                               f"the block size {settings.block_size} (give --size)")
        if client is None:
            client = connect(settings)
        if standby_left and not (client.log_position and client.log_position.slave_sync):
            raise ExportRefused(
                f"--standby {settings.standby}: the tlogserver keeps no standby of vdisk "
                f"{settings.vdisk} in step (slave sync is off for it: tlogserver "
                "--with-slave-sync, and slave_sync and slave_server in its config entry), "
                "so a failover to it would fail")
        intent = backend.intent_log(settings.state_file or None)
        state = converge(settings, backend, intent, client, size)
        standby = None
        if standby_left:
            def standby() -> Backend:
                return open_standby(settings, size)
        return LoggedDisk(backend, size, client, vdisk=settings.vdisk,
                          write_timeout=settings.write_timeout,
                          flush_timeout=settings.flush_timeout, standby=standby,
                          failover_timeout=settings.failover_timeout, intent=intent,
                          state=state, checkpoint_bytes=settings.checkpoint_bytes)
    except BaseException:
        if client is not None:
            client.close()
        if intent is not None:
            with contextlib.suppress(Exception):
                intent.close()
        for device in owned:
            with contextlib.suppress(Exception):
                device.close()
        raise


def _device(settings: NbdSettings, owned: list[Backend]
            ) -> tuple[Backend, bool, ThreadedClient | None]:
    """The device to serve (added to ``owned``), whether a standby is left to fail over to
    later, and the client when it had to connect already (a failover at start)."""
    if not settings.standby:
        owned.append(open_backend(settings))
        return owned[-1], False, None
    try:
        standby: Backend | None = open_standby(settings, settings.size)
    except BackendError as exc:
        standby = None
        unreachable = str(exc)
    if standby is not None:
        owned.append(standby)
        found = standby.intent_log().load()
        if found is not None and found.vdisk == settings.vdisk:
            log.warning("vdisk %s: serving the standby %s: the vdisk failed over to it "
                        "(%s); the backend it replaced is not the vdisk any more (bring it "
                        "back into step with tlog restore before serving it again)",
                        settings.vdisk, standby.describe(), found.describe())
            return standby, False, None
    try:
        primary = open_backend(settings)
    except BackendError as exc:
        if standby is None:
            raise BackendError(f"{exc}; and the standby: {unreachable}") from None
        log.error("vdisk %s: %s: starting on the standby %s, once the tlogserver confirms "
                  "it holds every logged write", settings.vdisk, exc, standby.describe())
        client = connect(settings)
        try:
            _take_over_at_start(settings, standby, client)
        except BaseException:
            client.close()
            raise
        return standby, False, client
    if standby is not None:  # only looked at
        owned.remove(standby)
        standby.close()
    owned.append(primary)
    return primary, True, None


def _take_over_at_start(settings: NbdSettings, standby: Backend,
                        client: ThreadedClient) -> None:
    """The backend cannot be opened: the standby becomes the device (`promote`) if the
    tlogserver confirms it holds every logged write; `ExportRefused` if not."""
    position = client.log_position
    if not (position and position.slave_sync):
        raise ExportRefused(f"vdisk {settings.vdisk}: the backend cannot be opened, and the "
                            f"tlogserver keeps no standby in step (slave sync is off for "
                            f"the vdisk): not serving the standby {standby.describe()}")
    try:
        client.wait_nbd_slave_sync(timeout=settings.failover_timeout)
    except (TimeoutError, TlogClientError) as exc:
        raise ExportRefused(f"vdisk {settings.vdisk}: the backend cannot be opened, and the "
                            f"tlogserver could not confirm that the standby "
                            f"{standby.describe()} holds every write ({exc})") from None
    state = ExportState(settings.vdisk, settings.block_size, settings.size or standby.size)
    promote(standby, client, state, timeout=settings.failover_timeout).close()


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
    kind = verdict(state, log_position(client), vdisk, backend.describe(),
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
