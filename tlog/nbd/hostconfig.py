"""The NBD servers' part of a fleet's config (``nbd_servers``): which vdisks each
``tlog nbd --config SOURCE --server-id ID`` serves, and with what settings, checked once
here for the supervisor, for tlogserver's config checks and for `tlog config`.

In a YAML file, or in etcd as one key per NBD server (``PREFIX/nbd_servers/<id>``)::

    nbd_servers:
      host-1:
        tlogservers: [10.0.0.1:11211]       # any vdisk setting here is a default
        backend: redis
        redis: 10.0.0.5:6379
        vdisks:
          vm-1: {size: 64M}
          vm-2: {size: 1G, block_size: 4096, standby: 10.0.0.6:6379}
          vm-3: {size: 10G, backend: file, image: /var/lib/tlog/{vdisk}.img}

A vdisk's settings are those of `tlog nbd` (`NbdSettings`), named as its flags with ``_``;
``{vdisk}`` in a path or key prefix is the vdisk's id. A vdisk may be served by one NBD
server only: two would write one log.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tlog.configsource import ConfigError

from .settings import NbdSettings, SettingsError

NBD_SERVERS = "nbd_servers"
#: A vdisk's settings in the config: its flag's name with ``_`` (tlogservers: --server).
VDISK_KEYS = ("size", "block_size", "backend", "image", "redis", "redis_key_prefix",
              "standby", "standby_key_prefix", "failover_timeout", "tlogservers", "state_file",
              "checkpoint_bytes", "write_timeout", "flush_timeout", "connect_timeout",
              "readonly", "tls", "tls_ca", "tls_cert", "tls_key", "token_file")
#: The settings where ``{vdisk}`` stands for the vdisk's id.
TEMPLATES = ("image", "state_file", "redis_key_prefix", "standby_key_prefix", "token_file")
#: A vdisk id the supervisor can name a socket after (and an NBD client can type).
VDISK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,99}")


def _settings(vdisk: str, values: Mapping[str, Any], where: str) -> NbdSettings:
    """The settings of one vdisk from its merged entry; ConfigError names the key."""
    settings = NbdSettings(vdisk=vdisk)
    for key, value in values.items():
        if key == "tlogservers":
            servers = [value] if isinstance(value, str) else value
            if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
                raise ConfigError(f"{where}: tlogservers: expected a list of host:port")
            settings.servers = list(servers)
            continue
        if isinstance(value, (list, dict)) or value is None:
            raise ConfigError(f"{where}: {key}: expected a single value, got {value!r}")
        text = str(value).replace("{vdisk}", vdisk) if key in TEMPLATES else str(value)
        try:
            settings.set(key, text)
        except SettingsError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    try:
        settings.check(local=False)  # the files: by the vdisk's own process, which fails alone
    except SettingsError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return settings


def _server_vdisks(server: str, entry: Any) -> dict[str, NbdSettings]:
    where = f"{NBD_SERVERS}: {server}"
    if entry is None:
        return {}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping (vdisks, and default settings)")
    unknown = sorted(str(k) for k in entry if k not in (*VDISK_KEYS, "vdisks"))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: vdisks, "
                          f"{', '.join(VDISK_KEYS)})")
    defaults = {k: v for k, v in entry.items() if k != "vdisks"}
    vdisks = entry.get("vdisks") or {}
    if not isinstance(vdisks, Mapping):
        raise ConfigError(f"{where}: vdisks: expected a mapping of vdisk id -> settings")
    out = {}
    for vdisk, own in vdisks.items():
        vdisk = str(vdisk)
        if not VDISK_ID.fullmatch(vdisk):
            raise ConfigError(f"{where}: vdisks: {vdisk!r} cannot name a socket: letters, "
                              "digits and ._:@+- (not first), at most 100")
        own = {} if own is None else own
        if not isinstance(own, Mapping):
            raise ConfigError(f"{where}: vdisks: {vdisk}: expected a mapping of settings")
        wrong = sorted(str(k) for k in own if k not in VDISK_KEYS)
        if wrong:
            raise ConfigError(f"{where}: vdisks: {vdisk}: unknown key(s) {', '.join(wrong)} "
                              f"(known: {', '.join(VDISK_KEYS)})")
        out[vdisk] = _settings(vdisk, {**defaults, **own}, f"{where}: vdisks: {vdisk}")
    return out


def nbd_servers(data: Mapping[str, Any]) -> Any:
    """The ``nbd_servers`` section, a mapping (empty when absent); ConfigError otherwise."""
    section = data.get(NBD_SERVERS)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{NBD_SERVERS}: expected a mapping of NBD server id -> entry")
    return section


def check_nbd_servers(data: Mapping[str, Any]) -> None:
    """Check every NBD server's entry of a config's content (not the files it names: they
    are on the servers' machines); ConfigError names the key."""
    owner: dict[str, str] = {}
    for server, entry in nbd_servers(data).items():
        for vdisk in _server_vdisks(str(server), entry):
            if vdisk in owner:
                raise ConfigError(f"{NBD_SERVERS}: vdisk {vdisk} is served by both "
                                  f"{owner[vdisk]} and {server}: two servers would write "
                                  "its log")
            owner[vdisk] = str(server)


def host_vdisks(data: Mapping[str, Any], server_id: str) -> dict[str, NbdSettings]:
    """The vdisks the config assigns to NBD server ``server_id``, with their settings
    (the whole section checked first); ConfigError names what is wrong."""
    check_nbd_servers(data)
    return _server_vdisks(server_id, nbd_servers(data).get(server_id))


def changed_settings(old: NbdSettings, new: NbdSettings) -> list[str]:
    """The names of the settings that differ (``servers`` shown as tlogservers)."""
    names = [name for name in vars(old) if getattr(old, name) != getattr(new, name)]
    return ["tlogservers" if n == "servers" else n for n in names]


def child_arguments(settings: NbdSettings) -> list[str]:
    """The `tlog nbd` flags that serve ``settings`` (one vdisk, in a process of its own)."""
    out = []
    for argument in settings.arguments():
        key, _, value = argument.partition("=")
        if key in ("readonly", "tls", "adopt"):
            if value == "1":
                out.append(f"--{key}")
        else:
            out += [f"--{key}", value]
    return out
