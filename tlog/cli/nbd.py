"""`tlog nbd`: serve a vdisk over NBD with nbdkit, every write logged to tlog servers.

The settings are checked here first (`tlog.nbd.settings`), then this process becomes
nbdkit (exec, in the foreground), running the plugin `tlog.nbd.plugin` with the same
settings; SIGTERM or SIGINT then stop nbdkit, which flushes the log before it exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from tlog.client import TlogClientError, parse_address
from tlog.configsource import ConfigError
from tlog.nbd.backend import BackendError
from tlog.nbd.convergence import ExportRefused
from tlog.nbd.disk import DEFAULT_CHECKPOINT_BYTES
from tlog.nbd.export import LOG_FORMAT, prepare
from tlog.nbd.host import serve_host
from tlog.nbd.intent import IntentError
from tlog.nbd.settings import NbdSettings, SettingsError

from .params import SIZE

PLUGIN = Path(__file__).resolve().parents[1] / "nbd" / "plugin.py"
#: nbdkit worker threads per NBD connection. Writes are logged one at a time (in log
#: order) and every thread contends for the plugin's one Python interpreter, so more
#: threads only add switching: nbdkit's default of 16 did 4 KiB writes at depth 16 about
#: 40 % slower than 2 (docs/nbd.md).
DEFAULT_THREADS = 2


def nbdkit_argv(settings: NbdSettings, *, socket: str | None, listen: str | None,
                verbose: bool = False, nbdkit: str = "nbdkit",
                threads: int = DEFAULT_THREADS) -> list[str]:
    """The nbdkit command line that serves ``settings``."""
    argv = [nbdkit, "--foreground", "--threads", str(threads)]
    if verbose:
        argv.append("--verbose")
    if socket:
        argv += ["--unix", socket]
    else:
        assert listen is not None
        host, port = parse_address(listen)
        argv += ["--ipaddr", host, "--port", str(port)]
    if settings.readonly:
        argv.append("--readonly")
    return [*argv, "python", str(PLUGIN), *settings.arguments()]


def plugin_path() -> list[str]:
    """This environment's package directories for the plugin to import tlog from: nbdkit
    embeds the system Python, whose own standard library must stay its own (an extension
    module of another build of Python does not load), so only site directories and entries
    outside this interpreter's installation are passed."""
    own = tuple(os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix})
    out = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        real = os.path.realpath(entry)
        if "site-packages" in real or not (real + os.sep).startswith(own):
            out.append(entry)
    return out


def plugin_environment() -> dict[str, str]:
    """This process' environment, with `plugin_path` in ``TLOG_NBD_PATH``."""
    env = dict(os.environ)
    env["TLOG_NBD_PATH"] = os.pathsep.join(plugin_path())
    return env


def claim_socket(path: str) -> None:
    """Make ``path`` free for nbdkit's unix socket: a socket left behind by an earlier run
    (nbdkit leaves it, even after a clean stop; a kill -9 certainly does) that nothing
    listens on is removed. Raises `click.ClickException` when something listens on it, or
    when it is not a socket."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise click.ClickException(f"--socket {path}: it exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody there: left behind
        except OSError as exc:
            raise click.ClickException(f"--socket {path}: cannot tell whether it is in use "
                                       f"({exc.strerror or exc})") from None
        else:
            raise click.ClickException(f"--socket {path}: something is listening on it "
                                       "already (another tlog nbd?)")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _converge(settings: NbdSettings) -> None:
    """Bring the device and the log into agreement (a recovery after an unclean stop)
    before nbdkit starts: a device that cannot be served is one line here, exit 1."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=LOG_FORMAT)
    try:
        prepare(settings)
    except (ExportRefused, BackendError, IntentError, TlogClientError, ConnectionError,
            TimeoutError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


def _check_nbdkit() -> str:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise click.ClickException("nbdkit is not installed (Debian: apt-get install nbdkit "
                                   "nbdkit-plugin-python)")
    probe = subprocess.run([nbdkit, "python", "--version"], capture_output=True, text=True,
                           check=False, timeout=30)
    if probe.returncode != 0:
        raise click.ClickException("nbdkit's Python plugin is not installed (Debian: apt-get "
                                   "install nbdkit-plugin-python)")
    return nbdkit


@click.command("nbd")
@click.option("--config", "config_source", default=None,
              metavar="FILE|etcd://HOST:PORT/PREFIX",
              help="Serve every vdisk the config's nbd_servers assigns to --server-id, each "
                   "on --socket-dir/VDISK.sock, following the config (docs/nbd.md, "
                   "\"Serving a host's vdisks\").")
@click.option("--server-id", default=None, envvar="TLOG_NBD_SERVER_ID", metavar="ID",
              help="With --config: this NBD server's id in nbd_servers [default: the "
                   "host name].")
@click.option("--socket-dir", default=None, metavar="DIR",
              help="With --config: where the vdisks' sockets are made (created if missing).")
@click.option("--vdisk", default=None, help="The vdisk to serve.")
@click.option("--server", "servers", multiple=True, metavar="HOST:PORT",
              help="tlogserver to log the writes to (repeat for failover, in order).")
@click.option("--image", default="", metavar="FILE",
              help="The image file holding the blocks (file backend); created if missing.")
@click.option("--size", type=SIZE, default=0, metavar="SIZE",
              help="The vdisk's size (bytes, or 64M, 10G, 1T): a new or shorter image is "
                   "extended to it. Default: the image's size.")
@click.option("--block-size", type=int, default=4096, show_default=True,
              help="The vdisk's block size: the unit of the log.")
@click.option("--socket", "socket_path", default=None, metavar="PATH",
              help="Serve on this unix socket.")
@click.option("--listen", default=None, metavar="HOST:PORT", help="Serve on this TCP address.")
@click.option("--backend", type=click.Choice(["file", "redis"]), default="file",
              show_default=True, help="Where the blocks live: the image file, or the Redis "
                                      "block store `tlog restore --output-redis` writes.")
@click.option("--redis", default="", metavar="ADDRESS",
              help="The block store (redis backend): host:port[@db] or "
                   "redis[s]://[user@]host:port[/db][?ca=FILE&password_file=FILE...], as "
                   "tlog restore's --storage-addresses (login, TLS).")
@click.option("--redis-key-prefix", default="", metavar="PREFIX",
              help="Key prefix of the block store [default: VDISK:].")
@click.option("--standby", default="", metavar="ADDRESS",
              help="The vdisk's standby (the block store tlogserver --with-slave-sync keeps "
                   "in step; an address as --redis): when the backend fails, serve from it, "
                   "once it holds every logged write (WaitNbdSlaveSync).")
@click.option("--standby-key-prefix", default="", metavar="PREFIX",
              help="Key prefix of the standby's blocks [default: VDISK:].")
@click.option("--failover-timeout", type=float, default=60.0, show_default=True,
              help="Seconds a failover may wait for the standby to hold every write; "
                   "beyond, the request fails with EIO.")
@click.option("--readonly", is_flag=True,
              help="Serve read-only, logging nothing (e.g. an image made by tlog restore).")
@click.option("--write-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a write may wait for the tlog client's buffer before it fails "
                   "with EIO.")
@click.option("--flush-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a FLUSH (or FUA write) may wait for FlushOK before it fails "
                   "with EIO.")
@click.option("--connect-timeout", type=float, default=30.0, show_default=True,
              help="Seconds to reach a tlogserver at start.")
@click.option("--tls", is_flag=True, help="Connect to the tlogservers over TLS.")
@click.option("--tls-ca", default="", metavar="FILE", help="CA certificates to trust.")
@click.option("--tls-cert", default="", metavar="FILE", help="Client certificate (mTLS).")
@click.option("--tls-key", default="", metavar="FILE", help="Its key.")
@click.option("--token-file", default="", metavar="FILE", help="The vdisk's access token.")
@click.option("--threads", type=click.IntRange(1, 64), default=DEFAULT_THREADS,
              show_default=True, help="nbdkit worker threads per NBD connection.")
@click.option("--state-file", default="", metavar="FILE",
              help="Where the image's tlog state and intent log are kept [default: beside "
                   "the image, IMAGE.tlog-state; needed for a block device]. A Redis block "
                   "store keeps them in two keys of its own.")
@click.option("--checkpoint-bytes", type=SIZE, default=DEFAULT_CHECKPOINT_BYTES,
              metavar="SIZE", show_default=True,
              help="Written between two background checkpoints (a FLUSH is one too): a "
                   "recovery after a crash of the process looks at about twice this at "
                   "most.")
@click.option("--metrics-address", default="", metavar="HOST:PORT",
              help="Serve the export's metrics for Prometheus at http://HOST:PORT/metrics "
                   "(recoveries, checkpoints, written blocks, failed requests...).")
@click.option("--adopt", is_flag=True,
              help="Take a device that has no tlog state (served by a tlog nbd of an older "
                   "version) as holding what the vdisk's log does. Nothing can check it.")
@click.option("--verbose", is_flag=True,
              help="Print the nbdkit command, and nbdkit's debug output.")
def nbd_command(socket_path: str | None, listen: str | None, verbose: bool, threads: int,
                servers: tuple[str, ...], size: int, config_source: str | None,
                server_id: str | None, socket_dir: str | None, **values: Any) -> None:
    """Serve a vdisk over NBD (nbdkit in the foreground), logging every write.

    Writes are logged before they reach the image; FLUSH and FUA wait until the tlog
    servers have stored them. Starting again continues the vdisk's log. Stop it with
    SIGTERM or Ctrl-C: the last writes are flushed first.

    With --config, serve every vdisk a fleet's config assigns to this server, each in an
    nbdkit of its own on --socket-dir/VDISK.sock, and follow the config.
    """
    if config_source is not None:
        _serve_host(config_source, server_id, socket_dir, values["metrics_address"], threads)
        return
    if socket_dir is not None or _given("server_id"):
        raise click.UsageError("--server-id and --socket-dir go with --config")
    if not values["vdisk"]:
        raise click.UsageError("give --vdisk (one vdisk) or --config (a host's vdisks)")
    if (socket_path is None) == (listen is None):
        raise click.UsageError("give exactly one of --socket PATH and --listen HOST:PORT")
    settings = NbdSettings(servers=list(servers), **values)
    try:
        settings.size = size
        settings.check()
        if listen is not None:
            parse_address(listen)
    except (SettingsError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    nbdkit = _check_nbdkit()
    if socket_path is not None:
        claim_socket(socket_path)
    if not settings.readonly:
        _converge(settings)
    argv = nbdkit_argv(settings, socket=socket_path, listen=listen, verbose=verbose,
                       nbdkit=nbdkit, threads=threads)
    if verbose:
        click.echo("tlog nbd: running " + " ".join(argv), err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(nbdkit, argv, plugin_environment())


#: The options `tlog nbd --config` takes; the others are the config's, per vdisk.
HOST_OPTIONS = ("config_source", "server_id", "socket_dir", "metrics_address", "threads",
                "verbose")


def _given(name: str) -> bool:
    """Whether option ``name`` was given on the command line (not a default, not the
    environment)."""
    source = click.get_current_context().get_parameter_source(name)
    return source == click.core.ParameterSource.COMMANDLINE


def _serve_host(source: str, server_id: str | None, socket_dir: str | None,
                metrics_address: str, threads: int) -> None:
    """`tlog nbd --config`: the supervisor of the host's vdisks (`tlog.nbd.host`)."""
    ctx = click.get_current_context()
    given = [f"--{name.replace('_', '-')}" for name in ctx.params
             if name not in HOST_OPTIONS and _given(name)]
    if given:
        raise click.UsageError(f"{', '.join(given)}: with --config each vdisk's settings are "
                               "the config's (nbd_servers)")
    if not socket_dir:
        raise click.UsageError("--config needs --socket-dir DIR (each vdisk's socket: "
                               "DIR/VDISK.sock)")
    if metrics_address:
        try:
            parse_address(metrics_address)
        except ValueError as exc:
            raise click.UsageError(f"--metrics-address: {exc}") from None
    _check_nbdkit()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=LOG_FORMAT)
    try:
        code = serve_host(source, server_id or socket.gethostname(), socket_dir,
                          metrics_address=metrics_address, threads=threads)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"--socket-dir {socket_dir}: {exc.strerror or exc}"
                                   ) from None
    sys.exit(code)
