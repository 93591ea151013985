"""Every Redis connection tlog makes logs in and checks TLS as its address says, by one recipe
(`ServerAddress.ssl_context`, `ServerAddress.redis_kwargs`): the block store `tlog restore
--output-redis` writes, `tlog nbd --backend redis` and its `--standby`, the standby slave
sync writes, the bulk readers' worker processes; and none of them accepts a certificate that
does not check out. Real redis-servers with ACL users, TLS only (``--port 0``) and client
certificates.
"""

from __future__ import annotations

import contextlib
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tlog.nbd.backend import RedisBackend
from tlog.nbd.settings import NbdSettings, open_standby
from tlog.read.chain import ChainReader
from tlog.read.player import PlayerError, RedisBlockStorage
from tlog.read.standby import StandbyStore, SyncPosition, parse_slave_targets
from tlog.storage import RedisStorageServer, ServerAddress, StoragePool
from tlog.storage.link import open_link
from tlog.storage.resp import RespConnection

from .certs import CertificateAuthority, Issued
from .redis_fixture import RedisFactory, RedisProcess, RedisTls
from .test_cli_read import KEY, read_args, start_tlogserver, tlog_cli
from .test_decoder import ChainWriter, applied, image_of, make_blocks, run, v2_opener
from .test_nbd import NbdServer, nbdcopy, qemu_io, restore
from .test_security import ACL_COMMANDS

#: What a block store's user needs: the player's SET/DEL/GET, the nbd backend's
#: MGET/MSET/DEL/PING, its state and intent log's SADD/SREM/SMEMBERS/EXISTS, SCAN for
#: large range deletes, and the login.
STORE_ACL = ("~*", "-@all", "+get", "+set", "+del", "+scan", "+mget", "+mset", "+ping",
             "+select", "+auth", "+sadd", "+srem", "+smembers", "+exists")
BS = 4096


@dataclass(frozen=True)
class Certs:
    ca: Path
    server: Issued  # 127.0.0.1
    misnamed: Issued  # elsewhere.example only
    client: Issued
    rogue_ca: Path  # trusted by nobody

    def server_tls(self, client_cert: bool = True) -> RedisTls:
        """A TLS-only server presenting ``server``; requiring ``client`` if asked."""
        return RedisTls(self.server.cert, self.server.key, self.ca,
                        self.client.cert if client_cert else None,
                        self.client.key if client_cert else None)

    def query(self) -> str:
        """The URL parameters trusting the CA and presenting the client certificate."""
        return f"ca={self.ca}&cert={self.client.cert}&key={self.client.key}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca = CertificateAuthority(directory)
    rogue = CertificateAuthority(directory, "rogue CA")
    return Certs(ca.path, ca.issue("server", "redis", ips=("127.0.0.1",), server=True),
                 ca.issue("misnamed", "redis", dns=("elsewhere.example",), server=True),
                 ca.issue("client", "tlog"), rogue.path)


def store_for(kind: str, factory: RedisFactory, certs: Certs,
              tmp_path: Path) -> tuple[RedisProcess, str, int]:
    """A block store (server, address, database): ``acl`` needs ACL user bob and his
    password (from a file), database 3; ``tls`` serves only TLS and wants a client
    certificate."""
    if kind == "acl":
        (store,) = factory(1, requirepass="admin-pw", user=["bob", "on", ">bob-pw", *STORE_ACL])
        password = tmp_path / "bob.pw"
        password.write_text("bob-pw\n")
        return store, f"redis://bob@127.0.0.1:{store.port}/3?password_file={password}", 3
    (store,) = factory(1, tls=certs.server_tls())
    return store, f"rediss://127.0.0.1:{store.port}?{certs.query()}", 0


def blocks_in(store: RedisProcess, db: int, prefix: bytes) -> dict[int, bytes]:
    """Block index -> bytes of the keys ``<prefix><index>`` in ``store``."""
    with contextlib.closing(store.client(db)) as client:
        return {int(key[len(prefix):]): client.get(key)
                for key in client.scan_iter(match=prefix + b"*") if key[len(prefix):].isdigit()}


@pytest.mark.parametrize("kind", ["acl", "tls"])
def test_restore_into_a_block_store_that_needs_a_login_or_tls(
        kind: str, redis6: list[RedisProcess], redis_factory: RedisFactory, certs: Certs,
        tmp_path: Path) -> None:
    writer = ChainWriter(redis6)
    blocks = writer.write(100, 25, indexes=40)
    store, address, db = store_for(kind, redis_factory, certs, tmp_path)
    result = tlog_cli("restore", *read_args(redis6, "vd1"), "--output-redis", address)
    assert "bob-pw" not in result.stdout + result.stderr
    assert blocks_in(store, db, b"vd1:") == image_of(blocks)


def test_every_connection_refuses_a_certificate_that_does_not_check_out(
        redis_factory: RedisFactory, certs: Certs) -> None:
    """A certificate made out to another name, or signed by a CA the address does not
    trust: the storage link, the bulk readers' socket, redis-py (nbd backend, block store)
    all refuse it; the same server with the right CA is reached by each of them."""
    (misnamed,) = redis_factory(1, tls=RedisTls(certs.misnamed.cert, certs.misnamed.key,
                                                certs.ca))
    (good,) = redis_factory(1, tls=certs.server_tls(client_cert=False))
    ok = ServerAddress.parse(f"rediss://127.0.0.1:{good.port}?ca={certs.ca}")
    refused = {
        "IP address mismatch": ServerAddress.parse(
            f"rediss://127.0.0.1:{misnamed.port}?ca={certs.ca}"),
        "certificate verify failed": ServerAddress.parse(
            f"rediss://127.0.0.1:{good.port}?ca={certs.rogue_ca}"),
    }

    async def link_ping(address: ServerAddress) -> Any:
        link = await open_link(address)
        try:
            return (await link.submit(b"*1\r\n$4\r\nPING\r\n", 1))[0]
        finally:
            link.close("done")

    async def store_block(address: ServerAddress) -> bytes:
        storage = RedisBlockStorage(address, "chk:", BS, timeout=5.0)
        try:
            await storage.apply(make_blocks(0, 1, indexes=1))
            return await storage.read(0)
        finally:
            await storage.close()

    assert run(link_ping(ok)) == b"PONG"
    conn = RespConnection(ok, 5.0)
    assert conn.command("PING") == b"PONG"
    conn.close()
    backend = RedisBackend(ok, "chk:", BS, BS)
    backend.write(0, b"\x42" * BS)
    assert backend.read(0, 1) == b"\x42" * BS
    backend.close()
    assert len(run(store_block(ok))) == BS
    for why, address in refused.items():
        with pytest.raises(ssl.SSLCertVerificationError, match=why):
            run(link_ping(address))
        with pytest.raises(ssl.SSLCertVerificationError, match=why):
            RespConnection(address, 5.0)
        # (as `RedisBackend` connects, without its retries: 4 s of backoff per refusal)
        client = redis.Redis(**address.redis_kwargs(), retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.ConnectionError, match=why):
            client.ping()
        with pytest.raises(PlayerError, match=why):
            run(store_block(address))


@pytest.mark.skipif(not all(shutil.which(t) for t in ("nbdkit", "nbdcopy", "qemu-io")),
                    reason="nbdkit, nbdcopy or qemu-io missing (make test installs them)")
@pytest.mark.parametrize("kind", ["acl", "tls"])
def test_nbd_serves_a_block_store_that_needs_a_login_or_tls(
        kind: str, redis6: list[RedisProcess], redis_factory: RedisFactory, certs: Certs,
        tmp_path: Path) -> None:
    """Writes through NBD land in the block store; the log restores to the same blocks,
    into a file and into the same store under another prefix."""
    store, address, db = store_for(kind, redis_factory, certs, tmp_path)
    size = 1 << 20
    copy = tmp_path / "copy.img"
    with start_tlogserver(redis6, KEY) as server:
        with NbdServer(tmp_path, "--vdisk", "nb", "--server", server.address, "--backend",
                       "redis", "--redis", address, "--size", str(size)) as nbd:
            qemu_io(nbd.uri, "write -P 0x5a 5000 20000", "write -P 0x33 600000 9000",
                    "write -z 8192 4096", "flush")
            nbdcopy(nbd.uri, str(copy))
            assert nbd.stop() == 0
            assert "bob-pw" not in nbd.log
    served = copy.read_bytes()
    stored = blocks_in(store, db, b"nb:")
    assert sorted(stored) == [1, 3, 4, 5, 6, 146, 147, 148]  # block 2 zeroed: no key
    image = bytearray(size)
    for index, data in stored.items():
        image[index * BS:(index + 1) * BS] = data
    assert bytes(image) == served and served[5000:5001] == b"\x5a"
    assert restore(redis6, "nb", tmp_path / "restored.img", size) == served
    tlog_cli("restore", *read_args(redis6, "nb"), "--output-redis", address,
             "--redis-key-prefix", "log:")
    assert blocks_in(store, db, b"log:") == stored


def test_the_standby_logs_in_and_checks_tls_as_its_address_says(
        redis_factory: RedisFactory, certs: Certs, tmp_path: Path) -> None:
    """``tlog nbd --standby`` and the ``slave_server`` slave sync writes: TLS only, client
    certificate, ACL user carol in database 2."""
    (store,) = redis_factory(1, tls=certs.server_tls(), requirepass="admin-pw",
                             user=["carol", "on", ">carol-pw", "~*", "+@all"])
    password = tmp_path / "carol.pw"
    password.write_text("carol-pw")
    address = f"rediss://carol@127.0.0.1:{store.port}/2?{certs.query()}&password_file={password}"
    settings = NbdSettings(vdisk="sb", servers=["127.0.0.1:1"], image=str(tmp_path / "img"),
                           size=16 * BS, standby=address, standby_key_prefix="sb:")
    settings.check()
    backend = open_standby(settings, 16 * BS)
    try:
        backend.write(3, b"\x77" * BS)
        assert backend.read(3, 2) == b"\x77" * BS + bytes(BS)
    finally:
        backend.close()
    assert blocks_in(store, 2, b"sb:") == {3: b"\x77" * BS}

    target = parse_slave_targets({"sync": {"slave_sync": True, "slave_server": address}})
    blocks = make_blocks(0, 20, indexes=8)

    async def sync() -> SyncPosition | None:
        standby = StandbyStore(target["sync"], BS, timeout=5.0)
        try:
            await standby.position()
            await standby.apply(blocks, SyncPosition().after(blocks, b"\x01" * 32, 0))
            return await standby.position()
        finally:
            await standby.close()

    position = run(sync())
    assert position is not None and position.sequence == 19
    assert blocks_in(store, 2, b"sync:") == image_of(blocks)


def test_bulk_readers_fetch_over_tls_as_an_acl_user(redis_factory: RedisFactory,
                                                    certs: Certs) -> None:
    """The worker processes of a long restore reach storage that serves only TLS, wants a
    client certificate and ACL user tlog, as the storage links do."""
    servers = redis_factory(6, tls=certs.server_tls(), requirepass="admin-pw",
                            user=["tlog", "on", ">tlog-pw", "~*", "-@all", *ACL_COMMANDS])
    writer = ChainWriter(servers)
    blocks = writer.write(400, 5)
    writer.close()
    stats = [s.client() for s in servers]  # one connection each, open throughout

    def counters() -> tuple[int, int]:
        """(EVAL calls on server 0, connections server 1 accepted so far)."""
        evals = stats[0].info("commandstats").get("cmdstat_eval", {}).get("calls", 0)
        return int(evals), int(stats[1].info("stats")["total_connections_received"])

    before = counters()

    async def read() -> list[Any]:
        pool = StoragePool([RedisStorageServer(
            ServerAddress("127.0.0.1", s.port, username="tlog", password="tlog-pw", tls=True,
                          tls_ca=str(certs.ca), tls_cert=str(certs.client.cert),
                          tls_key=str(certs.client.key)), socket_timeout=5.0)
            for s in servers], 4, 2)
        try:
            reader = ChainReader(pool, "vd1", v2_opener(), processes=True, workers=2,
                                 prefetch=8)
            return [item async for item in reader.items()]
        finally:
            await pool.close()

    items = run(read())
    assert applied(items) == blocks
    evals, connections = (a - b for a, b in zip(counters(), before, strict=True))
    for client in stats:
        client.close()
    assert evals > 0  # the walk went by the script (redis-py, same login and TLS)
    # The parent's storage link, and at least one worker's own: threads would be one.
    assert connections >= 2
