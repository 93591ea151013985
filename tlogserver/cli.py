"""`tlogserver` command line: flags (each also a TLOG_* variable) -> ServerConfig -> run."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import click

from tlog.allocator import tune_allocator
from tlog.configsource import EtcdUrl, is_etcd, load_etcd, load_yaml_file

from . import config as config_mod
from . import logs
from .config import ConfigError, ServerConfig
from .etcdsource import EtcdSource

_D = ServerConfig()


@click.command(context_settings={"help_option_names": ["-h", "--help"],
                                 "auto_envvar_prefix": "TLOG"})
@click.option("--address", default=_D.address, show_default=True,
              help="Address to listen on, host:port.")
@click.option("--storage-addresses", default="",
              help="Comma-separated k+m storage servers host:port[@db], or "
                   "redis://[user:password@]host:port[/db] / rediss://...?ca=FILE (TLS); "
                   "missing ones are filled in with sequential ports after the last one. Put "
                   "passwords in the config file, TLOG_STORAGE_ADDRESSES or "
                   "?password_file=FILE: not on the command line.")
@click.option("--memory-storage", is_flag=True,
              help="Use the embedded in-memory storage (the default when neither storage nor "
                   "--config is given); nothing survives a restart.")
@click.option("--config",
              help="YAML file with any of these options (underscored names) and the vdisk -> "
                   "storage cluster map; or etcd://HOST:PORT[,HOST:PORT...]/PREFIX to read "
                   "the same from etcd keys, watched (docs/operations.md).")
@click.option("-k", "--k", type=int, default=_D.k, show_default=True,
              help="Data pieces per aggregation.")
@click.option("-m", "--m", type=int, default=_D.m, show_default=True,
              help="Parity pieces per aggregation (that many servers may be lost).")
@click.option("--flush-size", type=int, default=_D.flush_size, show_default=True,
              help="Blocks per aggregation.")
@click.option("--flush-time", type=float, default=_D.flush_time, show_default=True,
              help="Seconds after which pending blocks are flushed anyway.")
@click.option("--block-size", type=int, default=_D.block_size, show_default=True,
              help="Block size of the vdisks, in bytes.")
@click.option("--priv-key", default=None,
              help="Master key: 32 characters used as key bytes (as 0-Disk). Kept for 0-Disk "
                   "compatibility only: a command line is readable by every local user (ps, "
                   "/proc). Use --key-file (or TLOG_PRIV_KEY) instead.")
@click.option("--key-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the current master key (32 raw bytes, 32 characters or 64 hex "
                   "digits): new aggregations are sealed with it.")
@click.option("--old-key-file", "--old-key-files", "old_key_files", multiple=True,
              type=click.Path(dir_okay=False),
              help="File holding a previous master key, to read aggregations sealed before a "
                   "key rotation (repeatable; each record names its key id).")
@click.option("--storage-format", type=click.Choice(["v3", "v2", "legacy"]),
              default=_D.storage_format, show_default=True,
              help="v3 (ours: random nonce per aggregation, BLAKE3 record keys), v2 (the same "
                   "with BLAKE2b keys, readable by a tlog that predates v3: to keep a rollback "
                   "open) or legacy (0-Disk's layout, static nonce).")
@click.option("--nonce", default=None,
              help="Legacy format only: the static AES-GCM nonce, 24 hex digits.")
@click.option("--max-message-size", type=int, default=_D.max_message_size, show_default=True,
              help="Largest client message accepted, in bytes.")
@click.option("--max-buffered-blocks", type=int, default=_D.max_buffered_blocks,
              show_default=True,
              help="Out-of-order window per vdisk: blocks further ahead get RecvFailed.")
@click.option("--max-buffered-bytes", type=int, default=_D.max_buffered_bytes,
              show_default=True, help="Bytes of out-of-order blocks kept per vdisk.")
@click.option("--max-pending-bytes", type=int, default=_D.max_pending_bytes,
              show_default=True,
              help="Bytes per vdisk received in order and not stored yet (storage behind or "
                   "down): beyond them, blocks get RecvFailed and are resent later.")
@click.option("--max-server-buffered-bytes", type=int, default=_D.max_server_buffered_bytes,
              show_default=True,
              help="Bytes of blocks all vdisks together hold (out of order or not stored "
                   "yet); beyond them, blocks get RecvFailed.")
@click.option("--max-connections", type=int, default=_D.max_connections, show_default=True,
              help="Client connections open at once; more are closed at accept (0: no "
                   "limit).")
@click.option("--stalled-writer-timeout", type=float, default=_D.stalled_writer_timeout,
              show_default=True,
              help="Seconds a client may leave its answers unread before it is cut off.")
@click.option("--ack-delay", type=float, default=_D.ack_delay, show_default=True,
              help="Seconds the answers to a read of few blocks (a client writing one block "
                   "at a time) may wait to be written together with the next ones; 0 answers "
                   "every read at once.")
@click.option("--handshake-timeout", type=float, default=_D.handshake_timeout,
              show_default=True, help="Seconds a new connection has to send its handshake.")
@click.option("--drain-timeout", type=float, default=_D.drain_timeout, show_default=True,
              help="Seconds to flush pending blocks on SIGTERM/SIGINT before exiting.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages (--log-level debug).")
@click.option("--log-level", type=click.Choice(list(config_mod.LOG_LEVELS)),
              default=_D.log_level, show_default=True, help="Least severe messages logged.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=_D.log_format,
              show_default=True,
              help="text, or json: one object per line with ts, level, logger, msg, vdisk, conn.")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Also write the log to this file.")
@click.option("--metrics-address", default=None,
              help="Serve /metrics (Prometheus), /healthz and /readyz over HTTP on host:port. "
                   "Off by default.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
              help="Certificate (PEM, chain included) of the listener: --address then speaks "
                   "TLS only.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None,
              help="Private key of --tls-cert (PEM), unless it is in the same file.")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False), default=None,
              help="CA certificates (PEM) that sign client certificates, for mtls access: a "
                   "certificate's names map to vdisks in the config's tls_clients.")
@click.option("--plain-address", default=None,
              help="With --tls-cert: also listen on host:port for plain TCP (0-Disk's Go "
                   "clients), for the vdisks whose access allows them.")
@click.option("--access", default=_D.access, show_default=True,
              help="Access of vdisks without their own rule in the config: plain (anyone), "
                   "token, mtls, or a comma-separated list (any one suffices).")
@click.option("--min-pieces", type=int, default=None,
              help="A flush is acknowledged once this many of its k+m pieces are stored "
                   "(k..k+m; default k+1).")
@click.option("--with-slave-sync", is_flag=True,
              help="Keep a standby copy of every vdisk whose config entry has slave_sync: "
                   "true (slave_server, slave_prefix) in step with its log, and answer "
                   "WaitNbdSlaveSync once it holds every flushed block.")
@click.option("--slave-sync-timeout", type=float, default=_D.slave_sync_timeout,
              show_default=True,
              help="Seconds a WaitNbdSlaveSync may wait for the standby before it fails.")
@click.option("--slave-sync-queue-bytes", type=int, default=_D.slave_sync_queue_bytes,
              show_default=True,
              help="Per vdisk: bytes of stored blocks kept for a standby that is behind; "
                   "beyond them it catches up from the log.")
@click.option("--server-id", default=None,
              help="With an etcd config: this server's name in the vdisk ownership keys, "
                   "registered on its lease: a second live server with it refuses to start "
                   "[default: hostname:port].")
@click.option("--owner-lease-ttl", type=int, default=_D.owner_lease_ttl, show_default=True,
              help="With an etcd config: seconds a vdisk stays owned by this server after "
                   "it stops renewing its lease (dies or loses etcd).")
@click.option("--retention-keep-since", default=None, metavar="DURATION",
              help="Compact the log of each vdisk served to keep every point of the last "
                   "DURATION restorable (90s, 15m, 2h, 7d, 1w); a vdisk's config entry may "
                   "set its own retention (docs/retention.md). Off by default.")
@click.option("--retention-keep-sequences", type=int, default=None, metavar="N",
              help="Compact each vdisk's log down to about its N newest sequences.")
@click.option("--retention-keep-bytes", default=None, metavar="SIZE",
              help="Compact each vdisk's log down to about SIZE of stored aggregations "
                   "(500MB, 10GiB; every piece on every server).")
@click.option("--retention-interval", default=_D.retention_interval, show_default=True,
              metavar="DURATION", help="How often a vdisk's retention policy is applied; "
                   "also how often (at most a minute) the served logs are looked at for "
                   "compactions made by hand (tlog compact), to measure them again.")
@click.pass_context
def command(ctx: click.Context, **values: Any) -> None:
    """Transaction-log server for virtual block devices (wire compatible with 0-Disk).

    Every option can also be given as an environment variable TLOG_<OPTION>, e.g.
    TLOG_PRIV_KEY, TLOG_STORAGE_ADDRESSES. Secrets (the master key, storage passwords)
    belong in files or the environment, never on the command line, which ps shows.
    SIGHUP re-reads the --config file: the storage map, the access rules, the old keys,
    the TLS certificate and the flush, window, timeout and log settings change at once.
    """
    values["storage_addresses"] = [a for a in values["storage_addresses"].split(",") if a.strip()]
    values["old_key_files"] = list(values["old_key_files"])
    key_on_command_line = (ctx.get_parameter_source("priv_key")
                           == click.core.ParameterSource.COMMANDLINE)
    explicit = {name for name in values
                if ctx.get_parameter_source(name) in (click.core.ParameterSource.COMMANDLINE,
                                                      click.core.ParameterSource.ENVIRONMENT)}
    source = None
    try:
        if is_etcd(values.get("config")):
            url = EtcdUrl.parse(values["config"])
            data = load_etcd(url)
            source = EtcdSource(url)
        else:
            data = load_yaml_file(values["config"]) if values.get("config") else {}
        cfg = config_mod.from_sources(values, explicit, data)
        config_mod.require_storage(cfg, data)  # a config source never means in-memory
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    logs.setup(cfg.effective_log_level, cfg.log_format, cfg.log_file)
    if key_on_command_line:
        logging.getLogger("tlogserver").warning(
            "--priv-key: the master key is on the command line, where every local user can "
            "read it (ps); use --key-file or TLOG_PRIV_KEY")
    tune_allocator()
    from .main import run

    def reload() -> ServerConfig:
        # The same flags and environment as at start; only the file is read again.
        return config_mod.from_sources(values, explicit)

    def rebuild(data: dict[str, Any]) -> ServerConfig:
        # The same flags and environment as at start, over what etcd holds now.
        return config_mod.from_sources(values, explicit, data)

    main = (run(cfg, reload=reload) if source is None
            else run(cfg, source=source, rebuild=rebuild))
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency
            code = asyncio.run(main)
        else:
            code = uvloop.run(main)
    except ConfigError as exc:  # found at start, e.g. this server id is in use already
        raise click.UsageError(str(exc)) from None
    sys.exit(code)


def main() -> None:
    command(prog_name="tlogserver")
