"""`tlog config`: read, check and write the configuration keys of an etcd config source
(`tlog.configsource` has the key layout).

A change is written only if the whole configuration, with it, passes
`tlogserver.config.check_file_data`, in one etcd transaction that fails if one of the keys
it changes was changed meanwhile. The servers' own keys (``owners/``, ``servers/``, on
their leases) are never written. A change of a setting the stored logs are written with
(`tlogserver.config.LOG_LAYOUT`: k, m...) is refused once the fleet has a configuration;
storage_format from v2 to v3 or back is not one (readers read both).

It is a command of the `tlog` tool, registered through the ``tlog.commands`` entry point
(the library does not import the daemon)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import aetcd
import click
import yaml

from tlog.configsource import (
    OWNERS,
    SERVERS,
    ConfigError,
    EtcdStore,
    EtcdUrl,
    assemble,
    describe_empty,
    dump_value,
    is_config_key,
    is_lease_key,
    key_name,
    key_path,
    load_yaml_file,
    parse_value,
    split,
)

from .config import (
    LOG_LAYOUT,
    RELOADABLE,
    ServerConfig,
    check_file_data,
    file_options,
    layout_moves,
)

#: Keys changed per etcd transaction (etcd allows 128 operations in one by default).
TXN_KEYS = 64


def _store(url: str) -> EtcdStore:
    try:
        return EtcdStore(EtcdUrl.parse(url))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


class _Snapshot:
    """Every key under the prefix as read once: values and modification revisions."""

    def __init__(self, prefix: str, kvs: list[Any]) -> None:
        self.prefix = prefix
        self.values: dict[str, bytes] = {}
        self.revisions: dict[str, int] = {}
        for kv in kvs:
            name = key_name(prefix, bytes(kv.key))
            if name is not None:
                self.values[name] = bytes(kv.value)
                self.revisions[name] = int(kv.mod_revision)

    @property
    def config(self) -> dict[str, bytes]:
        """The configuration keys (the servers' lease keys left out)."""
        return {n: v for n, v in self.values.items() if not is_lease_key(n)}

    def data(self, values: Mapping[str, bytes] | None = None) -> dict[str, Any]:
        """The configuration in the YAML file's shape."""
        items = (values if values is not None else self.config).items()
        return assemble([(key_path(self.prefix, n), v) for n, v in items], self.prefix)


async def _snapshot(store: EtcdStore) -> _Snapshot:
    client = await store.client()
    return _Snapshot(store.url.prefix, list(await client.get_prefix(key_path(store.url.prefix,
                                                                              ""))))


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except (ConfigError, aetcd.exceptions.ClientError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


url_option = click.option("--etcd", "url", required=True, envvar="TLOG_CONFIG",
                          metavar="etcd://HOST:PORT[,...]/PREFIX",
                          help="The config source, as given to tlogserver --config.")
force_option = click.option("--force", is_flag=True,
                            help="Also change k, m, block_size, storage_format or nonce "
                                 "(only before any log was written with them: the servers "
                                 "could not read those logs any more).")


@click.group("config")
def config_command() -> None:
    """Read, check and write tlogserver's configuration in etcd.

    Keys, under the prefix: server (options), clusters/<id>, vdisks/<id>,
    nbd_servers/<id> (tlog nbd --config), default_storage_cluster, tls_clients; values
    are YAML. The servers' own keys,
    owners/<vdisk> and servers/<id>, are read only (tlog config owners).
    """


def _dump(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=False).rstrip("\n")


@config_command.command("get")
@url_option
@click.argument("key", required=False)
def get_command(url: str, key: str | None) -> None:
    """Print KEY's value, or every configuration key with its value, as YAML."""
    store = _store(url)

    async def run() -> None:
        try:
            snap = await _snapshot(store)
        finally:
            await store.close()
        if key is not None:
            name = key.strip("/")
            if name not in snap.values:
                raise ConfigError(f"etcd key {store.url.prefix}/{name}: not set")
            click.echo(snap.values[name].decode(errors="replace").rstrip("\n"))
            return
        listing = {name: parse_value(f"{store.url.prefix}/{name}", raw)
                   for name, raw in sorted(snap.config.items())}
        if listing:
            click.echo(_dump(listing))
    _run(run())


@config_command.command("export")
@url_option
@click.argument("path", type=click.Path(dir_okay=False, allow_dash=True), default="-")
def export_command(url: str, path: str) -> None:
    """Write the configuration as a tlogserver YAML file (PATH, or '-': standard output),
    which tlog config import takes back."""
    store = _store(url)

    async def run() -> dict[str, Any]:
        try:
            return (await _snapshot(store)).data()
        finally:
            await store.close()
    data = _run(run())
    text = f"# tlog config export of {store.url}\n" + (
        yaml.safe_dump(data, default_flow_style=False, sort_keys=False) if data else "")
    if path == "-":
        click.echo(text, nl=False)
        return
    # It may hold secrets (a key, storage passwords): readable by its owner only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    click.echo(f"{path}: {len(split(data))} key(s) exported", err=True)


@config_command.command("owners")
@url_option
def owners_command(url: str) -> None:
    """Print which server owns which vdisk, and the server ids registered (the servers'
    lease keys, which tlog config never writes)."""
    store = _store(url)

    async def run() -> None:
        try:
            snap = await _snapshot(store)
        finally:
            await store.close()
        servers = {name.partition("/")[2]: parse_value(name, raw)
                   for name, raw in sorted(snap.values.items())
                   if name.startswith(SERVERS + "/")}
        owners = {name.partition("/")[2]: raw.decode(errors="replace")
                  for name, raw in sorted(snap.values.items())
                  if name.startswith(OWNERS + "/")}
        click.echo(_dump({"servers": servers, "owners": owners}))
    _run(run())


@config_command.command("check")
@url_option
def check_command(url: str) -> None:
    """Check every key as tlogserver would; exit 1 naming the first bad one, or when the
    prefix holds no configuration."""
    store = _store(url)

    async def run() -> dict[str, Any]:
        try:
            snap = await _snapshot(store)
        finally:
            await store.close()
        if not snap.config:
            raise ConfigError(f"{store.url}: {describe_empty(str(store.url))}")
        data = snap.data()
        _check(data, str(store.url))
        return data
    data = _run(run())
    click.echo(f"{store.url}: {len(split(data))} key(s), valid")
    if not _defines_storage(data):
        click.echo("note: it defines no storage (storage_clusters with vdisks or a "
                   "default_storage_cluster, or storage_addresses): each tlogserver needs "
                   "--storage-addresses, or refuses to start")


def _defines_storage(data: Mapping[str, Any]) -> bool:
    return bool(data.get("storage_clusters") or data.get("storage_addresses"))


def _check(data: Mapping[str, Any], source: str) -> None:
    """What a server checks, and what only a fleet's shared keys must not hold."""
    check_file_data(data, source)
    if "server_id" in data:
        raise ConfigError(f"config {source}: server_id: each server's own (--server-id or "
                          "TLOG_SERVER_ID), not a setting of the whole fleet")


def _layout(data: Mapping[str, Any]) -> dict[str, Any]:
    """The log layout settings a server would run with (defaults where not set)."""
    defaults = ServerConfig()
    options = file_options(data, None)
    return {name: options.get(name, getattr(defaults, name)) for name in LOG_LAYOUT}


def _option_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """``flush_size 25 -> 50 (at once)`` for each server option that changes."""
    defaults = ServerConfig()
    old, new = file_options(before, None), file_options(after, None)
    notes = []
    for name in sorted(set(old) | set(new)):
        was, now = old.get(name, getattr(defaults, name)), new.get(name, getattr(defaults, name))
        if was == now:
            continue
        when = "at once" if name in RELOADABLE else "after each server's restart"
        shown = "(changed)" if name in ("priv_key", "nonce") else f"{was!r} -> {now!r}"
        notes.append(f"{name} {shown} ({when})")
    return notes


Changes = dict[str, "bytes | None"]


def _refuse_key(name: str) -> None:
    if is_lease_key(name):
        raise click.UsageError(f"{name}: a server's own key, on its lease (tlog config "
                               "never writes it); a vdisk changes owner when it goes idle "
                               "on its owner or the owner stops")
    if not is_config_key(name):
        raise click.UsageError(f"{name}: unknown key (expected server, clusters/<id>, "
                               "vdisks/<id>, nbd_servers/<id>, default_storage_cluster or "
                               "tls_clients)")


def _write(url: str, edit: Callable[[_Snapshot], Changes], dry_run: bool,
           force: bool) -> tuple[Changes, list[str]]:
    """Read the keys, make the ``edit`` of them (key -> value, None: delete), check the
    result and write it. Returns the changes and what they change for the servers."""
    store = _store(url)

    async def run() -> tuple[Changes, list[str]]:
        try:
            snap = await _snapshot(store)
            changes = edit(snap)
            before: dict[str, Any] | None
            try:
                before = snap.data()
                file_options(before, None)
            except ConfigError:
                before = None  # broken now: the change may be its fix
            values = dict(snap.config)
            for name, value in changes.items():
                _refuse_key(name)
                if value is None:
                    values.pop(name, None)
                else:
                    values[name] = value
            after = snap.data(values)
            _check(after, str(store.url))
            if before is not None and snap.config and not force:
                old, new = _layout(before), _layout(after)
                moved = [f"{n} {old[n]!r} -> {new[n]!r}" for n in LOG_LAYOUT
                         if layout_moves(n, old[n], new[n])]
                if moved:
                    raise ConfigError(f"{', '.join(moved)}: refused: the fleet's logs are "
                                      "written with it and a live log cannot change it "
                                      "(--force only if no log was written yet)")
            if not dry_run:
                await _commit(store, snap, changes)
            return changes, _option_changes(before or {}, after)
        finally:
            await store.close()
    changes, notes = _run(run())
    return changes, notes


async def _commit(store: EtcdStore, snap: _Snapshot, changes: Changes) -> None:
    """Write ``changes``, each only if its key is as read (else nobody's change is lost:
    the command fails and can be run again)."""
    client = await store.client()
    tx = client.transactions
    names = sorted(changes)
    for start in range(0, len(names), TXN_KEYS):
        chunk = names[start:start + TXN_KEYS]
        compare = [tx.mod(key_path(store.url.prefix, n)) == snap.revisions.get(n, 0)
                   for n in chunk]
        success = [tx.delete(key_path(store.url.prefix, n)) if changes[n] is None
                   else tx.put(key_path(store.url.prefix, n), changes[n]) for n in chunk]
        ok, _ = await client.transaction(compare=compare, success=success, failure=[])
        if not ok:
            raise ConfigError("the keys changed while this command ran (someone else's "
                              "change): nothing more written; run it again")


def _say(what: str, notes: list[str]) -> None:
    click.echo(what + (f"; {', '.join(notes)}" if notes else ""))


def _merged(snap: _Snapshot, key: str, value: Any, merge: bool, replace: bool) -> Any:
    """The value to write into ``key``: merged into the current mapping with ``merge``;
    refused when it would silently drop fields of it."""
    raw = snap.values.get(key)
    old = None if raw is None else parse_value(f"{snap.prefix}/{key}", raw)
    if merge and not isinstance(value, dict):
        raise click.UsageError(f"{key}: --merge needs a mapping (field: value)")
    if not isinstance(old, dict) or replace:
        return value
    if merge:
        return {**old, **value}
    dropped = [str(f) for f in old if not isinstance(value, dict) or f not in value]
    if dropped:
        raise click.UsageError(f"{key}: the value would drop {', '.join(dropped)}: give "
                               "--merge to change only the fields given, or --replace to "
                               "replace the whole value")
    return value


@config_command.command("put")
@url_option
@click.argument("key")
@click.argument("value", required=False)
@click.option("--file", "path", type=click.File("rb"), help="Read the value from a file "
              "('-': standard input).")
@click.option("--merge", is_flag=True, help="Set only the fields given in the key's "
              "mapping (server, a vdisk's entry...), keeping the others.")
@click.option("--replace", is_flag=True, help="Replace the whole value, dropping the fields "
              "not given.")
@force_option
@click.option("--dry-run", is_flag=True, help="Check only.")
def put_command(url: str, key: str, value: str | None, path: Any, merge: bool, replace: bool,
                force: bool, dry_run: bool) -> None:
    """Set KEY to VALUE (YAML), once the configuration with it checks out.

    A value that would drop fields of the key's current mapping is refused: --merge sets
    only the fields given (tlog config put server 'flush_size: 50' --merge), --replace
    replaces it all.
    """
    if (value is None) == (path is None):
        raise click.UsageError("give the value, or --file")
    if merge and replace:
        raise click.UsageError("give --merge or --replace, not both")
    raw = path.read() if path is not None else value.encode()  # type: ignore[union-attr]
    name = key.strip("/")
    _refuse_key(name)
    try:
        parsed = parse_value(name, raw)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None

    def edit(snap: _Snapshot) -> Changes:
        new = _merged(snap, name, parsed, merge, replace)
        return {name: raw if new is parsed else dump_value(new)}
    _, notes = _write(url, edit, dry_run, force)
    _say(f"{name}: {'valid' if dry_run else 'written'}", notes)


@config_command.command("delete")
@url_option
@click.argument("key")
@force_option
def delete_command(url: str, key: str, force: bool) -> None:
    """Delete KEY, once the configuration without it checks out."""
    name = key.strip("/")
    _refuse_key(name)
    _, notes = _write(url, lambda snap: {name: None}, False, force)
    _say(f"{name}: deleted", notes)


@config_command.command("import")
@url_option
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--prune", is_flag=True, help="Also delete the configuration keys the file "
              "does not hold (the file is then the whole configuration).")
@force_option
@click.option("--dry-run", is_flag=True, help="Check only.")
def import_command(url: str, path: str, prune: bool, force: bool, dry_run: bool) -> None:
    """Write a tlogserver YAML config file into the keys (one per cluster, per vdisk...),
    such as tlog config export writes.

    Keys the file does not hold are kept and listed, or deleted with --prune.
    """
    try:
        keys = split(load_yaml_file(path))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    others: list[str] = []

    def edit(snap: _Snapshot) -> Changes:
        changes: Changes = {name: dump_value(value) for name, value in keys.items()}
        others.extend(sorted(name for name in snap.config if name not in changes))
        if prune:
            changes.update({name: None for name in others})
        return changes
    _, notes = _write(url, edit, dry_run, force)
    _say(f"{path}: {len(keys)} key(s) {'valid' if dry_run else 'written'}", notes)
    if others:
        listed = ", ".join(others)
        if not prune:
            click.echo(f"kept {len(others)} key(s) not in the file: {listed} (--prune "
                       "deletes them)")
        else:
            click.echo(f"{'would delete' if dry_run else 'deleted'} {len(others)} key(s) not "
                       f"in the file: {listed}")
