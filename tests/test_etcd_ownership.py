"""Vdisk ownership leases: two real tlogserver processes behind one real etcd, storing into
the same real redis-servers; one owner per vdisk, takeover after the owner dies."""

from __future__ import annotations

import asyncio

import yaml

from tlog.client import ThreadedClient
from tlog.protocol import Operation
from tlog.protocol.status import HandshakeStatus

from .etcd_fixture import EtcdProcess, etcd  # noqa: F401  (the fixture)
from .redis_fixture import RedisProcess
from .serverproc import ServerProcess, stored_sequences
from .test_cli_read import KEY, read_args, tlog_cli
from .wireclient import WireClient

WAIT = 30.0


def fleet(store: EtcdProcess, redis6: list[RedisProcess], ttl: int = 2
          ) -> tuple[ServerProcess, ServerProcess]:
    store.put("/tlog/clusters/main", yaml.safe_dump({"servers": [r.address for r in redis6]}))
    store.put("/tlog/default_storage_cluster", "main")
    servers = tuple(ServerProcess("--config", store.url(), "--priv-key", KEY,
                                  "--owner-lease-ttl", str(ttl), "--flush-size", "25")
                    for _ in range(2))
    for server in servers:
        server.start()
    return servers[0], servers[1]


def write(client: ThreadedClient, first: int, count: int) -> None:
    for i in range(first, first + count):
        client.send_next(Operation.SET, i % 64, None, i.to_bytes(8, "little") * 512)


def check_log(redis6: list[RedisProcess], vdisk: str, blocks: int) -> None:
    assert sorted(set(asyncio.run(stored_sequences([r.address for r in redis6], vdisk)))) \
        == list(range(blocks))
    proc = tlog_cli("verify", *read_args(redis6, vdisk))
    assert "error" not in proc.stdout.lower(), proc.stdout


def test_two_servers_racing_for_a_vdisk_have_one_owner(etcd: EtcdProcess,  # noqa: F811
                                                       redis6: list[RedisProcess]) -> None:
    one, two = fleet(etcd, redis6)
    try:
        async def race() -> tuple[list[int], bytes | None, ServerProcess, ServerProcess]:
            clients = await asyncio.gather(WireClient.connect(one.port, vdisk="race"),
                                           WireClient.connect(two.port, vdisk="race"))
            statuses = [c.handshake.status for c in clients]
            owner_key = await asyncio.to_thread(etcd.get, "/tlog/owners/race")
            owner, other = (one, two) if statuses[0] == HandshakeStatus.OK else (two, one)
            # While the owner has the vdisk open, a client listing the other server first is
            # refused there and goes on to the owner.
            await asyncio.to_thread(write_through, [other.address, owner.address])
            for c in clients:
                await c.close()
            return statuses, owner_key, owner, other

        def write_through(servers: list[str]) -> None:
            with ThreadedClient(servers, "race", None) as client:
                write(client, 0, 300)
                client.wait_flushed(timeout=WAIT)

        statuses, owner_key, owner, other = asyncio.run(race())
        assert sorted(statuses) == sorted([HandshakeStatus.OK, HandshakeStatus.NOT_OWNER])
        assert owner_key is not None and owner_key.endswith(f":{owner.port}".encode())
        assert other.output().count("handshake refused: vdisk race is owned by") >= 2
        # Released once idle: the other server may take it now.
        with ThreadedClient([other.address], "race", None, connect_timeout=WAIT) as client:
            write(client, 300, 100)
            client.wait_flushed(timeout=WAIT)
            taken = etcd.get("/tlog/owners/race")
            assert taken is not None and taken.endswith(f":{other.port}".encode())
    finally:
        one.kill()
        two.kill()
    check_log(redis6, "race", 400)


def test_the_owner_killed_and_its_lease_expiring_lets_the_other_take_over(
        etcd: EtcdProcess, redis6: list[RedisProcess]) -> None:  # noqa: F811
    one, two = fleet(etcd, redis6, ttl=2)
    try:
        with ThreadedClient([one.address, two.address], "takeover", None,
                            reconnect_delay=0.05) as client:
            write(client, 0, 500)
            client.wait_flushed(timeout=WAIT)
            one.kill()  # -9: its lease runs out after 2 s
            write(client, 500, 500)
            client.wait_flushed(timeout=WAIT)
        two.wait_for_log("handshake refused: vdisk takeover is owned by")  # until expiry
        two.wait_for_log("owner of the vdisk")
    finally:
        one.kill()
        two.kill()
    check_log(redis6, "takeover", 1000)
