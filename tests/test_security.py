"""Security: TLS, mutual TLS, per-vdisk tokens, key rotation and rekey, storage credentials.

Everything real: TLS over loopback sockets with certificates made for the test, tlogservers
in this process and as subprocesses (uvloop), redis-servers with requirepass, ACL users and
TLS, the `tlog` commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import capnp
import pytest
import yaml
from click.testing import CliRunner

from tlog.cli import cli as tlog_cli
from tlog.client import (
    TlogClient,
    UnauthorizedError,
    client_tls_context,
    load_token,
)
from tlog.protocol import ClientConnection, Handshake, ServerConnection
from tlog.protocol.status import BlockStatus, HandshakeStatus, Operation
from tlog.record import crypto
from tlog.storage import ServerAddress, StorageConfigError
from tlogserver.access import (
    AccessPolicy,
    TokenHash,
    certificate_identities,
    hash_token,
    new_token,
    verify_token,
)
from tlogserver.config import ConfigError, ServerConfig, from_sources
from tlogserver.server import TlogServer

from .certs import Pki, make_pki
from .redis_fixture import RedisFactory, RedisProcess, free_port
from .serverproc import start_server
from .vectors import wire
from .wireclient import WireClient, chain_blocks, read_chain

WAIT = 20.0
TOKEN = new_token()
ACL_COMMANDS = ("+get", "+mget", "+set", "+mset", "+lpush", "+ltrim", "+lrange", "+lindex",
                "+ping", "+del", "+scan", "+eval", "+evalsha", "+select", "+auth", "+hello")
BS = 4096


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def data_of(seq: int) -> bytes:
    return hashlib.sha256(seq.to_bytes(8, "little")).digest() * (BS // 32)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def write_yaml(path: Path, data: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def config_from(path: str, **flags: Any) -> ServerConfig:
    """What `tlogserver --config path --address 127.0.0.1:0 [flags]` would run with."""
    values: dict[str, Any] = {"config": path, "address": "127.0.0.1:0", **flags}
    return from_sources(values, set(values) - {"config"})


@contextlib.asynccontextmanager
async def serving(cfg: ServerConfig) -> AsyncIterator[TlogServer]:
    server = TlogServer(cfg)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


def port(sockets: list[Any]) -> int:
    return int(sockets[0].getsockname()[1])


async def send_blocks(client: TlogClient, sequences: range) -> None:
    for seq in sequences:
        await client.send(Operation.SET, seq, seq, seq + 1, data_of(seq))
    await client.wait_flushed(timeout=WAIT)


def storage_keys(servers: list[RedisProcess]) -> int:
    total = 0
    for server in servers:
        with contextlib.closing(server.client()) as c:
            total += int(c.dbsize())
    return total


# ---------------------------------------------------------------------------------------------
# The handshake's token field


def test_token_field_is_optional_and_ignored_by_old_schemas(tmp_path: Path) -> None:
    plain = ClientConnection.send_handshake("vm-1", 5)
    with_token = ClientConnection.send_handshake("vm-1", 5, token=b"t" * 40)
    assert plain != with_token and len(with_token) == len(plain) + 8 + 40
    events = ServerConnection().receive_data(with_token)
    assert events == [Handshake(events[0].version, "vm-1", 5, False, b"t" * 40)]
    assert "tttt" not in repr(events[0])  # a token never reaches a log line through repr
    assert ServerConnection().receive_data(plain)[0].token == b""
    # A peer with the reference schema (no field @4) reads the same request without it.
    old = capnp.load(str(Path(__file__).with_name("reference_layout.capnp")))
    with old.HandshakeRequest.from_bytes(with_token) as request:
        assert (request.vdiskID, request.firstSequence) == ("vm-1", 5)


def test_token_hashes() -> None:
    token = new_token()
    assert len(token) >= 40
    first, second = hash_token(token), hash_token(token)
    assert first != second  # salted
    assert verify_token(token.encode(), first) and verify_token(token.encode(), second)
    assert not verify_token(token.encode()[:-1], first)
    assert not verify_token(b"", first)
    assert not TokenHash.parse(first, "x").matches(b"x" * 5000)
    with pytest.raises(ValueError, match="too short"):
        hash_token("short")
    for bad in ("sha256:zz:00", "md5:00:00", "sha256:00", 42):
        with pytest.raises(ValueError, match="token_hash"):
            TokenHash.parse(bad, "vdisks.a.token_hash")


def test_certificate_identities() -> None:
    cert = {"subject": ((("countryName", "BE"),), (("commonName", "nbd-a"),)),
            "subjectAltName": (("DNS", "nbd-a.example"), ("IP Address", "10.0.0.1"),
                               ("URI", "spiffe://tlog/nbd-a"))}
    assert certificate_identities(cert) == ("nbd-a", "nbd-a.example", "spiffe://tlog/nbd-a")
    assert certificate_identities({}) == () and certificate_identities(None) == ()
    policy = AccessPolicy(tls_clients={"nbd-a.example": ("vm-a*", "shared")})
    assert policy.certificate_allows(("x", "nbd-a.example"), "vm-a7")
    assert not policy.certificate_allows(("nbd-a.example",), "vm-b")


@pytest.mark.parametrize(("data", "flags", "message"), [
    ({"access": "tokn"}, {}, "unknown access mode 'tokn'"),
    ({"vdisks": {"a": {"access": "token"}}}, {}, "vdisks.a.token_hash: missing"),
    ({"vdisks": {"a": {"access": "plain", "token_hash": hash_token(TOKEN)}}}, {},
     "vdisks.a.token_hash: given, but its access"),
    ({"vdisks": {"a": {"access": "token", "token_hash": "sha256:00"}}}, {},
     "vdisks.a.token_hash: expected"),
    ({"access": "mtls"}, {"tls": True}, "mtls needs tls-client-ca"),
    ({"tls_clients": {"nbd-a": ["vm-*"]}}, {"tls": True}, "tls_clients: needs tls-client-ca"),
    ({"tls_clients": {"nbd-a": [3]}}, {"tls": True, "ca": True}, "tls_clients.nbd-a"),
    ({}, {"tls_key": "x.key"}, "tls-key: needs tls-cert"),
    ({}, {"plain_address": "127.0.0.1:1"}, "plain-address: needs tls-cert"),
    ({"tls_cert": "/nonexistent.crt"}, {}, "tls-cert / tls-key: cannot load /nonexistent.crt"),
    ({"old_key_files": ["/nonexistent.key"]}, {}, "old-key-file: cannot read key file"),
    ({"min_pieces": 7}, {}, "min-pieces: must be a whole number from k (4) to k+m (6)"),
])
def test_bad_security_settings_name_the_key(tmp_path: Path, pki: Pki, data: dict[str, Any],
                                            flags: dict[str, Any], message: str) -> None:
    data = dict(data)
    if flags.pop("tls", False):
        data.update(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    if flags.pop("ca", False):
        data["tls_client_ca"] = str(pki.ca)
    path = write_yaml(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from(path, **flags)


def test_defaults_stay_compatible(tmp_path: Path) -> None:
    cfg = config_from(write_yaml(tmp_path / "c.yaml", {"k": 4, "m": 2}))
    assert cfg.access_policy.check("any", b"", None).allowed  # plain, as 0-Disk
    assert cfg.min_pieces == 5 and not cfg.tls
    assert config_from(write_yaml(tmp_path / "d.yaml", {"k": 2, "m": 0})).min_pieces == 2


# ---------------------------------------------------------------------------------------------
# TLS, tokens, the plain listener for Go clients


def test_tls_tokens_and_plain_go_clients(redis_factory: RedisFactory, tmp_path: Path,
                                         pki: Pki) -> None:
    stores = redis_factory(3)
    addresses = [s.address for s in stores]
    key = os.urandom(16).hex()  # 32 characters: used as the key's bytes
    key_file = tmp_path / "master.key"
    key_file.write_text(key + "\n")
    path = write_yaml(tmp_path / "tlog.yaml", {
        "storage_addresses": addresses, "k": 2, "m": 1, "key_file": str(key_file),
        "flush_size": 25, "tls_cert": str(pki.server.cert), "tls_key": str(pki.server.key),
        "plain_address": "127.0.0.1:0", "access": "token",
        "vdisks": {"myimg": {"access": "plain"},
                   "secret": {"access": ["token"], "token_hash": hash_token(TOKEN)},
                   "secret2": {"access": "token", "token_hash": hash_token(TOKEN)}},
    })
    c2s, _, manifest = wire("n2")
    want_flush = [f["decoded"]["sequences"] for f in manifest["s2c_frames"][1:]
                  if f["decoded"].get("status") == 2]
    tls = client_tls_context(str(pki.ca))

    async def scenario() -> None:
        async with serving(config_from(path)) as server:
            tls_port, plain_port = port(server.sockets), port(server.plain_sockets)
            main = [f"127.0.0.1:{tls_port}"]
            # 1. Over TLS with the right token: works.
            async with TlogClient(main, "secret", tls=tls, token=TOKEN) as client:
                await client.connect(WAIT)
                await send_blocks(client, range(30))
            # 2. A plain client against the TLS listener: refused, not even an answer.
            raw = await WireClient.connect(tls_port, vdisk=None)
            raw.write(ClientConnection.send_handshake("myimg", 0))
            await raw.wait_closed()
            assert raw.events == []
            with pytest.raises(ConnectionError):
                await TlogClient.open(main, "myimg", timeout=1.0)
            # 3. TLS without trusting the server's CA (system trust): refused by the client.
            with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                await TlogClient.open(main, "secret", timeout=1.0, tls=client_tls_context(),
                                      token=TOKEN)
            # 4. Wrong or missing token, blocks sent right behind the handshake: the status
            # Unauthorized, the connection closed, nothing kept, stored or opened.
            for token in (b"not-the-token-at-all", None):
                raw = await WireClient.connect(plain_port, vdisk=None)
                raw.write(ClientConnection.send_handshake("secret2", 0, token=token)
                          + b"".join(ClientConnection.send_block(s, s, 1, data_of(s))
                                     for s in range(20)))
                await raw.wait_closed()
                assert [e.status for e in raw.events] == [HandshakeStatus.UNAUTHORIZED]
            with pytest.raises(UnauthorizedError):
                await TlogClient.open(main, "secret2", tls=tls, token="wrong" * 8, timeout=5)
            assert "secret2" not in server.vdisks  # never opened: no chain read, no state
            assert server.stats.handshakes_refused == {"unauthorized": 3}
            assert server.stats.received_blocks == 30
            # 5. The Go client's stream, over the plain listener, to a plain-access vdisk.
            go = await WireClient.connect(plain_port, vdisk=None)
            go.write(c2s)
            await go.wait_flushed([s for group in want_flush for s in group])
            assert [list(g) for g in go.responses(BlockStatus.FLUSH_OK)] == want_flush
            await go.close()
            # ... but a Go client (no token) cannot open a token vdisk there.
            go = await WireClient.connect(plain_port, vdisk="secret")
            assert go.handshake.status == HandshakeStatus.UNAUTHORIZED
            await go.close()

    run(scenario())
    for server in stores:  # nothing of secret2 anywhere in storage
        with contextlib.closing(server.client()) as c:
            assert not any(b"secret2" in key for key in c.keys())
    assert chain_blocks(read_chain(addresses, "secret", key, 2, 1)) == [
        (s, s, data_of(s)) for s in range(30)]


# ---------------------------------------------------------------------------------------------
# Mutual TLS, in a tlogserver process (uvloop)


def test_client_certificates_open_only_their_vdisks(tmp_path: Path, pki: Pki) -> None:
    path = write_yaml(tmp_path / "tlog.yaml", {
        "memory_storage": True, "flush_size": 5, "access": "mtls",
        "tls_cert": str(pki.server.cert), "tls_key": str(pki.server.key),
        "tls_client_ca": str(pki.ca),
        "tls_clients": {"nbd-a.example": ["vm-a*"], "nbd-b": "vm-b"},
        "vdisks": {"open-to-all": {"access": "plain"}},
    })

    def context(issued: Any = None, ca: Path = pki.ca) -> Any:
        return client_tls_context(str(ca), str(issued.cert) if issued else None,
                                  str(issued.key) if issued else None)

    # (a key on the command line works, for 0-Disk's sake, with a warning)
    with start_server("--config", path, "--priv-key", "k" * 32) as server:
        main = [server.address]
        server.wait_for_log("--priv-key: the master key is on the command line")

        async def opens(vdisk: str, tls: Any) -> bool:
            try:
                client = await TlogClient.open(main, vdisk, tls=tls, timeout=5)
            except UnauthorizedError:
                return False
            try:
                await send_blocks(client, range(5))
            finally:
                await client.close()
            return True

        async def scenario() -> None:
            a, b, none = context(pki.client_a), context(pki.client_b), context()
            assert await opens("vm-a1", a) and await opens("vm-a2", a)
            assert not await opens("vm-b", a)  # allowed for vm-a*, not for vm-b
            assert await opens("vm-b", b) and not await opens("vm-a1", b)
            assert not await opens("vm-a1", none)  # TLS without a certificate
            assert await opens("open-to-all", none)  # a plain-access vdisk: anyone
            # A certificate naming nbd-a.example, signed by a CA the server does not trust:
            # the TLS handshake itself fails.
            with pytest.raises(ConnectionError):
                await TlogClient.open(main, "vm-a1", tls=context(pki.rogue_client), timeout=2)

        run(scenario())
        refused = server.wait_for_log(r"handshake refused, unauthorized: needs mtls: "
                                      r"certificate nbd-b not allowed")
        assert "vm-a1" in refused
        assert "listening on" in server.wait_for_log("TLS, client certificates checked")


# ---------------------------------------------------------------------------------------------
# SIGHUP: access rules change without a restart


def test_reload_swaps_tokens_and_keeps_connected_clients(tmp_path: Path) -> None:
    old, new = new_token(), new_token()
    file = tmp_path / "tlog.yaml"

    def config(token: str) -> ServerConfig:
        write_yaml(file, {"memory_storage": True, "flush_size": 5, "access": "token",
                          "vdisks": {"vm": {"token_hash": hash_token(token)}}})
        return config_from(str(file))

    async def scenario() -> None:
        async with serving(config(old)) as server:
            main = [f"127.0.0.1:{port(server.sockets)}"]
            kept = await TlogClient.open(main, "vm", token=old, timeout=5)
            await send_blocks(kept, range(5))
            assert server.reload_from(lambda: config(new))
            with pytest.raises(UnauthorizedError):
                await TlogClient.open(main, "vm", token=old, timeout=5)
            async with TlogClient(main, "vm", 10, token=new) as fresh:
                await fresh.connect(5)
            await send_blocks(kept, range(5, 10))  # admitted before: keeps its connection
            await kept.close()
            # A file that does not validate changes nothing.
            file.write_text("access: token\nvdisks: {vm: {access: token}}\n")
            assert not server.reload_from(lambda: config_from(str(file)))
            async with TlogClient(main, "vm", 10, token=new) as again:
                await again.connect(5)

    run(scenario())


# ---------------------------------------------------------------------------------------------
# Key rotation, restore with several keys, rekey


def tlog(*args: str) -> Any:
    """The real `tlog` command, in this process (no TLOG_* variables)."""
    result = CliRunner().invoke(tlog_cli, list(args), env={k: None for k in os.environ
                                                           if k.startswith("TLOG_")
                                                           and k != "TLOG_NO_EXTENSIONS"})
    return result


def test_rotation_restore_and_rekey(redis_factory: RedisFactory, tmp_path: Path) -> None:
    stores = redis_factory(3)
    addresses = ",".join(s.address for s in stores)
    key1, key2 = tmp_path / "key1", tmp_path / "key2"
    key1.write_bytes(os.urandom(32))  # raw bytes
    key2.write_text(os.urandom(32).hex() + "\n")  # 64 hex digits
    id1 = f"{crypto.key_id(crypto.load_key_file(str(key1))):08x}"
    id2 = f"{crypto.key_id(crypto.load_key_file(str(key2))):08x}"
    common = {"storage_addresses": addresses.split(","), "k": 2, "m": 1, "flush_size": 10}

    async def write(sequences: range, **keys: Any) -> None:
        cfg = ServerConfig(address="127.0.0.1:0", flush_time=30.0, **common, **keys).validate()
        async with serving(cfg) as server:
            main = [f"127.0.0.1:{port(server.sockets)}"]
            async with TlogClient(main, "vm", sequences.start) as client:
                await client.connect(WAIT)
                await send_blocks(client, sequences)

    run(write(range(0, 40), key_file=str(key1)))
    # Rotation: key 2 writes, key 1 still reads (the chain's head is a key-1 record).
    run(write(range(40, 80), key_file=str(key2), old_key_files=[str(key1)]))
    reading = ["--vdisk", "vm", "--storage-addresses", addresses, "-k", "2", "-m", "1"]
    listed = tlog("inspect", "--json", *reading, "--key-file", str(key2), "--key-file",
                  str(key1))
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [r["key_id"] for r in rows] == [id1] * 4 + [id2] * 4
    expected = b"".join(data_of(s) for s in range(80))

    def restore(*keys: str) -> Any:
        out = tmp_path / "vm.img"
        result = tlog("restore", *reading, *keys, "-o", str(out))
        return result, out.read_bytes() if out.exists() else b""

    result, image = restore("--key-file", str(key2), "--old-key-file", str(key1))
    assert result.exit_code == 0, result.output
    assert image == expected
    # The server's config file gives the readers both keys too.
    server_config = write_yaml(tmp_path / "tlog.yaml", {**common, "key_file": str(key2),
                                                         "old_key_files": [str(key1)]})
    checked = tlog("verify", "--config", server_config, "--vdisk", "vm")
    assert checked.exit_code == 0 and "chain sound: 8 aggregations" in checked.output
    # Without the old key: a clear failure naming the missing key's id.
    result, _ = restore("--key-file", str(key2))
    assert result.exit_code == 1
    assert f"master key id {id1}, which was not given" in result.output
    assert f"keys given: {id2}" in result.output
    # Retire key 1: rewrite the chain under key 2, drop the old records.
    both = ["--key-file", str(key2), "--old-key-file", str(key1)]
    dry = tlog("rekey", *reading, *both, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"by key id: {id1}: 4, {id2}: 4" in dry.output or \
        f"by key id: {id2}: 4, {id1}: 4" in dry.output
    assert "would rewrite 8" in dry.output
    records_before = storage_keys(stores)
    done = tlog("rekey", *reading, *both, "--delete-old")
    assert done.exit_code == 0, done.output
    assert "rewrote 8 under key id " + id2 in done.output and "deleted 8" in done.output
    assert storage_keys(stores) == records_before  # 8 new records replaced 8 old ones
    result, image = restore("--key-file", str(key2))  # key 1 no longer needed
    assert result.exit_code == 0, result.output
    assert image == expected
    again = tlog("rekey", *reading, *both)
    assert again.exit_code == 0 and "rewrote 0" in again.output and "kept 8" in again.output
    # A server holding only key 2 continues the rewritten chain.
    run(write(range(80, 90), key_file=str(key2)))
    result, image = restore("--key-file", str(key2))
    assert image == expected + b"".join(data_of(s) for s in range(80, 90))
    # A rekey refuses to run while it cannot read every record.
    missing = tlog("rekey", *reading, "--key-file", str(key1))
    assert missing.exit_code == 1 and f"master key id {id2}" in missing.output


# ---------------------------------------------------------------------------------------------
# Storage credentials: requirepass, ACL users, TLS


def test_storage_with_password_acl_user_and_tls(redis_factory: RedisFactory, tmp_path: Path,
                                                pki: Pki) -> None:
    tls_port = free_port()
    (plain,) = redis_factory(1, requirepass="pa55-word")
    # The ACL docs/security.md recommends: only the commands tlog runs.
    (acl,) = redis_factory(1, requirepass="admin-pw",
                           user=["alice", "on", ">alice-pw", "~*", "-@all", *ACL_COMMANDS])
    (tls,) = redis_factory(1, requirepass="tls-pw", tls_port=tls_port,
                           tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key),
                           tls_ca_cert_file=str(pki.ca), tls_auth_clients="yes")
    password_file = tmp_path / "alice.pw"
    password_file.write_text("alice-pw\n")
    key_file = tmp_path / "master.key"
    key_file.write_text(os.urandom(32).hex())
    storage = [f"redis://:pa55-word@127.0.0.1:{plain.port}",
               f"redis://alice@127.0.0.1:{acl.port}/2?password_file={password_file}",
               f"rediss://:tls-pw@127.0.0.1:{tls_port}?ca={pki.ca}&cert={pki.client_a.cert}"
               f"&key={pki.client_a.key}"]
    path = write_yaml(tmp_path / "tlog.yaml", {"storage_addresses": storage, "k": 2, "m": 1,
                                                "key_file": str(key_file), "flush_size": 10})
    with start_server("--config", path) as server:
        async def scenario() -> None:
            async with TlogClient([server.address], "vm", 0) as client:
                await client.connect(WAIT)
                await send_blocks(client, range(30))
        run(scenario())
        log = server.output()
    assert not any(secret in log for secret in ("pa55-word", "alice-pw", "tls-pw"))
    assert f"rediss://127.0.0.1:{tls_port}" in log  # the servers, without their passwords
    with contextlib.closing(acl.client(db=2)) as c:  # alice wrote to database 2
        assert c.llen(b"last_hash_vm") == 3
    out = tmp_path / "vm.img"
    result = tlog("restore", "--config", path, "--vdisk", "vm", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == b"".join(data_of(s) for s in range(30))
    # A wrong password fails naming the server, never the password.
    wrong = [storage[0].replace("pa55-word", "not-it"), *storage[1:]]
    result = tlog("verify", "--storage-addresses", ",".join(wrong), "-k", "2", "-m", "1",
                  "--key-file", str(key_file), "--vdisk", "vm")
    assert "not-it" not in result.output and "pa55" not in result.output
    assert result.exit_code == 0  # one server lost of k+m=3: rebuilt from parity, a warning
    assert f"redis://127.0.0.1:{plain.port}" in result.output


def test_storage_addresses_keep_passwords_out_of_text() -> None:
    address = ServerAddress.parse("rediss://bob:s%40cret@[::1]:6380/3?ca=/etc/ca.pem")
    assert (address.username, address.password, address.db, address.tls) == (
        "bob", "s@cret", 3, True)
    assert str(address) == "rediss://bob@[::1]:6380/3" and "cret" not in repr(address)
    assert address.redis_kwargs()["ssl_ca_certs"] == "/etc/ca.pem"
    assert ServerAddress.parse("10.0.0.1:6379@2") == ServerAddress("10.0.0.1", 6379, 2)
    with pytest.raises(StorageConfigError) as err:
        ServerAddress.parse("redis://bob:s3cret@host")
    assert "s3cret" not in str(err.value) and "***" in str(err.value)
    with pytest.raises(StorageConfigError, match="need rediss://"):
        ServerAddress.parse("redis://h:1?ca=/x")


def test_help_says_keys_and_tokens_stay_off_the_command_line(tmp_path: Path) -> None:
    from tlogserver.cli import command

    server_help = " ".join(CliRunner().invoke(command, ["--help"]).output.split())
    assert "--priv-key TEXT Master key" in server_help
    assert "command line is readable by every local user (ps" in server_help
    restore_help = " ".join(tlog("restore", "--help").output.split())
    assert "command line is readable by every local user (ps)" in restore_help
    token_file = tmp_path / "t"
    token_file.write_text(TOKEN + "\n")
    assert load_token(str(token_file)) == TOKEN.encode()


def test_rekey_turns_a_go_servers_legacy_log_into_v2(redis6: list[RedisProcess],
                                                     tmp_path: Path) -> None:
    from .test_legacy import VDISK, check_image, load_dump, manifest
    from .vectors import NONCE_HEX, PRIV_KEY

    load_dump("ff30", redis6)  # what 0-Disk's Go server left in its 6 servers
    key_file = tmp_path / "legacy.key"
    key_file.write_bytes(PRIV_KEY)
    reading = ["--vdisk", VDISK, "--storage-addresses", ",".join(s.address for s in redis6),
               "--key-file", str(key_file)]
    done = tlog("rekey", *reading, "--format", "auto", "--nonce", NONCE_HEX, "--delete-old")
    assert done.exit_code == 0, done.output
    assert "(by key id: legacy: " in done.output and "kept 0" in done.output
    rows = [json.loads(line) for line in
            tlog("inspect", "--json", *reading, "--format", "v2").output.splitlines()]
    assert rows and all(r["format"] == "v3" for r in rows)  # --format v2 reads v3 too
    out = tmp_path / "go.img"
    result = tlog("restore", *reading, "--format", "v2", "-o", str(out))
    assert result.exit_code == 0, result.output
    check_image(out, manifest("ff30"))


def test_security_options_for_command_line_tools(tmp_path: Path, pki: Pki) -> None:
    from tlog.client import security_options

    assert security_options() == {}
    token_file = tmp_path / "t"
    token_file.write_text(TOKEN + "\n")
    options = security_options(ca_file=str(pki.ca), token_file=str(token_file))
    assert options["token"] == TOKEN.encode() and options["tls"].check_hostname
    assert security_options(tls=True)["tls"].verify_mode.name == "CERT_REQUIRED"
    with pytest.raises(ValueError, match="cannot read token file"):
        security_options(token_file=str(tmp_path / "missing"))


def test_tlog_send_over_tls_with_a_token_file(redis_factory: RedisFactory, tmp_path: Path,
                                              pki: Pki) -> None:
    import subprocess
    import sys

    stores = redis_factory(3)
    key_file = tmp_path / "master.key"
    key_file.write_text(os.urandom(16).hex() + "\n")
    path = write_yaml(tmp_path / "tlog.yaml", {
        "storage_addresses": [s.address for s in stores], "k": 2, "m": 1,
        "key_file": str(key_file), "tls_cert": str(pki.server.cert),
        "tls_key": str(pki.server.key), "access": "token",
        "vdisks": {"vd": {"access": "token", "token_hash": hash_token(TOKEN)}},
    })
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = start_server("--config", path)
    try:
        def send(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-c", "from tlog.cli import main; main()", "send",
                 "--server", server.address, "--vdisk", "vd", "--blocks", "200",
                 "--connect-timeout", "2", *extra],
                capture_output=True, text=True, timeout=60)

        ok = send("--tls-ca", str(pki.ca), "--token-file", str(token_file))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["blocks"] == 200
        no_token = send("--tls-ca", str(pki.ca))
        assert no_token.returncode != 0 and "Unauthorized" in no_token.stderr
        no_tls = send("--token-file", str(token_file))
        assert no_tls.returncode != 0
        assert TOKEN not in ok.stdout + ok.stderr + no_token.stderr + server.output()
    finally:
        server.kill()
