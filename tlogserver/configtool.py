"""`tlog config`: read, check and write the configuration keys of an etcd config source
(`tlog.configsource` has the key layout). A value is written only if the whole
configuration, with it, passes `tlogserver.config.check_file_data`.

It is a command of the `tlog` tool, registered through the ``tlog.commands`` entry point
(the library does not import the daemon)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aetcd
import click
import yaml

from tlog.configsource import ConfigError, EtcdStore, EtcdUrl, assemble, key_path

from .config import check_file_data


def _source(url: str) -> EtcdStore:
    try:
        return EtcdStore(EtcdUrl.parse(url))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


async def _items(source: EtcdStore) -> list[tuple[bytes, bytes]]:
    client = await source.client()
    found = await client.get_prefix(key_path(source.url.prefix, ""))
    return [(bytes(kv.key), bytes(kv.value)) for kv in found]


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except (ConfigError, aetcd.exceptions.ClientError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


url_option = click.option("--etcd", "url", required=True, envvar="TLOG_CONFIG",
                          metavar="etcd://HOST:PORT[,...]/PREFIX",
                          help="The config source, as given to tlogserver --config.")


@click.group("config")
def config_command() -> None:
    """Read, check and write tlogserver's configuration in etcd.

    Keys, under the prefix: server (options), clusters/<id>, vdisks/<id>,
    default_storage_cluster, tls_clients; values are YAML.
    """


@config_command.command("get")
@url_option
@click.argument("key", required=False)
def get_command(url: str, key: str | None) -> None:
    """Print KEY's value, or every key with its value."""
    source = _source(url)

    async def run() -> None:
        try:
            items = await _items(source)
        finally:
            await source.close()
        base = source.url.prefix + "/"
        if key is not None:
            wanted = (base + key.strip("/")).encode()
            for k, v in items:
                if k == wanted:
                    click.echo(v.decode(errors="replace").rstrip("\n"))
                    return
            raise ConfigError(f"etcd key {wanted.decode()}: not set")
        for k, v in items:
            click.echo(f"--- {k.decode(errors='replace')[len(base):]}")
            click.echo(v.decode(errors="replace").rstrip("\n"))
    _run(run())


@config_command.command("check")
@url_option
def check_command(url: str) -> None:
    """Check every key as tlogserver would; exit 1 naming the first bad one."""
    source = _source(url)

    async def run() -> int:
        try:
            items = await _items(source)
        finally:
            await source.close()
        check_file_data(assemble(items, source.url.prefix), str(source.url))
        return len(items)
    count = _run(run())
    click.echo(f"{source.url}: {count} key(s), valid")


def _write(url: str, changes: dict[str, bytes | None], dry_run: bool) -> None:
    source = _source(url)

    async def run() -> None:
        try:
            items = dict(await _items(source))
            base = source.url.prefix + "/"
            for name, value in changes.items():
                full = (base + name.strip("/")).encode()
                if value is None:
                    items.pop(full, None)
                else:
                    items[full] = value
            check_file_data(assemble(list(items.items()), source.url.prefix), str(source.url))
            if dry_run:
                return
            client = await source.client()
            for name, value in changes.items():
                full = (base + name.strip("/")).encode()
                if value is None:
                    await client.delete(full)
                else:
                    await client.put(full, value)
        finally:
            await source.close()
    _run(run())


@config_command.command("put")
@url_option
@click.argument("key")
@click.argument("value", required=False)
@click.option("--file", "path", type=click.File("rb"), help="Read the value from a file "
              "('-': standard input).")
@click.option("--dry-run", is_flag=True, help="Check only.")
def put_command(url: str, key: str, value: str | None, path: Any, dry_run: bool) -> None:
    """Set KEY to VALUE (YAML), once the configuration with it checks out."""
    if (value is None) == (path is None):
        raise click.UsageError("give the value, or --file")
    raw = path.read() if path is not None else value.encode()  # type: ignore[union-attr]
    _write(url, {key: raw}, dry_run)
    click.echo(f"{key}: {'valid' if dry_run else 'written'}")


@config_command.command("delete")
@url_option
@click.argument("key")
def delete_command(url: str, key: str) -> None:
    """Delete KEY, once the configuration without it checks out."""
    _write(url, {key: None}, False)
    click.echo(f"{key}: deleted")


@config_command.command("import")
@url_option
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Check only.")
def import_command(url: str, path: str, dry_run: bool) -> None:
    """Write a tlogserver YAML config file into the keys (one per cluster, per vdisk...)."""
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise click.UsageError(f"{path}: the top level must be a mapping")
    changes: dict[str, bytes | None] = {}
    options = {k: v for k, v in data.items()
               if k not in ("storage_clusters", "vdisks", "default_storage_cluster",
                            "tls_clients")}
    if options:
        changes["server"] = yaml.safe_dump(options).encode()
    for name, group in (("clusters", "storage_clusters"), ("vdisks", "vdisks")):
        for ident, entry in (data.get(group) or {}).items():
            changes[f"{name}/{ident}"] = yaml.safe_dump(entry).encode()
    for single in ("default_storage_cluster", "tls_clients"):
        if single in data:
            changes[single] = yaml.safe_dump(data[single]).encode()
    _write(url, changes, dry_run)
    click.echo(f"{path}: {len(changes)} key(s) {'valid' if dry_run else 'written'}")
