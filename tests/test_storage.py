"""tlog.storage against real redis-server processes (and the in-memory storage)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tlog.storage import (
    LAST_HASH_KEEP,
    ClusterPoolFactory,
    HeadMoved,
    MemoryPoolFactory,
    MemoryStorageServer,
    RedisStorageServer,
    ScriptRefused,
    ServerAddress,
    StaticPoolFactory,
    StorageConfig,
    StorageConfigError,
    StorageError,
    StoragePool,
    StorageServer,
    any_pool_factory,
    keys,
    last_hash_key,
    load_storage_config,
    parse_addresses,
    parse_storage_config,
)
from tlog.storage.blockstore import block_index, block_key, scan_pattern
from tlog.storage.resp import BIG_ARG, pack_command_parts, pack_commands

from .redis_fixture import RedisFactory, RedisProcess

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Drive one coroutine to completion (pytest-asyncio is not used in this suite)."""
    return asyncio.run(coro)


def addr(server: RedisProcess, db: int = 0) -> ServerAddress:
    return ServerAddress(server.host, server.port, db)


# ---------------------------------------------------------------------------------------------
# Addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:6379", ServerAddress("127.0.0.1", 6379, 0)),
        ("localhost:16379@3", ServerAddress("localhost", 16379, 3)),
        (" redis-1.example.com:6380 ", ServerAddress("redis-1.example.com", 6380, 0)),
        ("[::1]:6379@2", ServerAddress("::1", 6379, 2)),
        ("[fe80::1]:1", ServerAddress("fe80::1", 1, 0)),
    ],
)
def test_address_parse(text: str, expected: ServerAddress) -> None:
    address = ServerAddress.parse(text)
    assert address == expected
    assert ServerAddress.parse(str(address)) == address


def test_address_str() -> None:
    assert str(ServerAddress("h", 1)) == "h:1"
    assert str(ServerAddress("h", 1, 4)) == "h:1@4"
    assert str(ServerAddress("::1", 6379, 2)) == "[::1]:6379@2"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "expected host:port"),
        ("localhost", "expected host:port"),
        (":6379", "missing host"),
        ("host:", "not a number"),
        ("host:abc", "not a number"),
        ("host:0", "out of range"),
        ("host:65536", "out of range"),
        ("host:6379@x", "database"),
        ("host:6379@-1", "database"),
        ("::1:6379", "brackets"),
        ("[::1:6379", "missing ']'"),
        ("[nope]:6379", "not an IPv6 address"),
        ("[::1]6379", "expected [ipv6]:port"),
        ("ho st:6379", "not a valid host"),
        ("http://x:1", "not a valid host"),
        ("a/b:1", "not a valid host"),
    ],
)
def test_address_junk(text: str, reason: str) -> None:
    with pytest.raises(StorageConfigError) as info:
        ServerAddress.parse(text)
    message = str(info.value)
    assert message.startswith(f"storage address {text!r}: ")
    assert reason in message


def test_parse_addresses_exact_and_list() -> None:
    text = ",".join(f"10.0.0.{i}:6379" for i in range(6))
    assert [a.host for a in parse_addresses(text, 6)] == [f"10.0.0.{i}" for i in range(6)]
    assert parse_addresses(text.split(","), 6, autofill=False) == parse_addresses(text, 6)
    halves = [",".join(text.split(",")[:3]), ",".join(text.split(",")[3:])]
    assert parse_addresses(halves, 6, autofill=False) == parse_addresses(text, 6)


def test_parse_addresses_autofill() -> None:
    assert parse_addresses("a:1000,b:2000@2", 5) == [
        ServerAddress("a", 1000),
        ServerAddress("b", 2000, 2),
        ServerAddress("b", 2001, 2),
        ServerAddress("b", 2002, 2),
        ServerAddress("b", 2003, 2),
    ]
    assert [a.port for a in parse_addresses(["[::1]:7000"], 3)] == [7000, 7001, 7002]


def test_parse_addresses_errors() -> None:
    with pytest.raises(StorageConfigError, match="7 storage servers given, k\\+m = 6 needed"):
        parse_addresses(",".join(f"h:{p}" for p in range(1, 8)), 6)
    with pytest.raises(StorageConfigError, match="2 storage servers given, k\\+m = 6 needed"):
        parse_addresses("h:1,h:2", 6, autofill=False)
    with pytest.raises(StorageConfigError, match="no storage servers given"):
        parse_addresses("", 6)
    with pytest.raises(StorageConfigError, match="out of range"):
        parse_addresses("h:65534", 6)
    with pytest.raises(StorageConfigError, match="'h:2' is given twice"):
        parse_addresses("h:2,h:1", 3)  # autofill after h:1 collides with h:2
    with pytest.raises(StorageConfigError, match="storage address 'nope'"):
        parse_addresses("h:1,nope", 2)


def test_last_hash_key() -> None:
    assert last_hash_key("myimg") == b"last_hash_myimg"


def test_the_storage_keys_keep_their_names() -> None:
    """The names are the storage format: a stored log must be found by the next version."""
    assert keys.checkpoint_list_key("v") == b"tlog_checkpoints_v"
    assert keys.pin_list_key("v") == b"tlog_pins_v"
    assert keys.compaction_key("v") == b"tlog_compact_v"
    assert keys.compaction_parts_key("v") == b"tlog_compact_parts_v"
    assert keys.compaction_lock_key("v") == b"tlog_compact_lock_v"
    assert keys.marker_key("v", bytes(range(32))) == b"tlog_missing_v:" + bytes(range(32)).hex(
    ).encode()
    assert keys.marker_value([2, 5]) == b"2,5"
    assert keys.parse_marker_value(b"2,5,x, 7") == [2, 5, 7]
    assert keys.standby_position_key(b"vd:") == b"vd:tlog:slave-sync"
    assert keys.nbd_state_key(b"vd:") == b"vd:tlog:nbd"
    assert keys.nbd_regions_key(b"vd:") == b"vd:tlog:nbd-regions"
    assert block_key(b"vd:", 42) == b"vd:42"
    # the keys beside the blocks are no block's
    for other in (keys.standby_position_key(b"vd:"), keys.nbd_state_key(b"vd:"),
                  keys.nbd_regions_key(b"vd:")):
        assert block_index(b"vd:", other) is None


def test_markers_and_block_keys_are_found_by_scan_whatever_the_name(
        redis_factory: RedisFactory) -> None:
    """A vdisk id or prefix with glob characters matches itself alone in a SCAN."""
    (proc,) = redis_factory(1)
    client = proc.client()
    vdisk, other = "a*[b]?\\", "a-[b]x\\"
    key = bytes(range(32))
    client.set(keys.marker_key(vdisk, key), b"1")
    client.set(keys.marker_key(other, key), b"1")
    client.set(keys.marker_key(vdisk, key)[:-2], b"1")  # garbled: no hash
    found = sorted(client.scan_iter(match=keys.marker_pattern(vdisk)))
    assert len(found) == 2
    assert sorted(keys.marker_hash(vdisk, name) for name in found
                  if keys.marker_hash(vdisk, name)) == [key]
    assert keys.marker_hash(other, keys.marker_key(vdisk, key)) is None
    prefix = vdisk.encode()
    client.set(block_key(prefix, 7), b"x")
    client.set(block_key(other.encode(), 7), b"x")
    assert {k for k in client.scan_iter(match=scan_pattern(prefix))
            if block_index(prefix, k) is not None} == {block_key(prefix, 7)}


# ---------------------------------------------------------------------------------------------
# Config


GOOD_CONFIG: dict[str, Any] = {
    "storage_clusters": {
        "fast": {"servers": [f"10.0.0.1:{6379 + i}" for i in range(6)]},
        "slow": {"servers": [f"10.0.0.2:{6379 + i}@1" for i in range(7)]},
    },
    "vdisks": {"a": {"storage_cluster": "fast"}, 123: {"storage_cluster": "slow"}},
    "default_storage_cluster": "slow",
    "listen": "ignored: belongs to the server config",
}


def test_parse_storage_config_good() -> None:
    config = parse_storage_config(GOOD_CONFIG, required=6)
    assert config.vdisks == {"a": "fast", "123": "slow"}
    assert config.default_cluster == "slow"
    assert config.clusters["slow"][0] == ServerAddress("10.0.0.2", 6379, 1)
    assert len(config.clusters["slow"]) == 7
    assert config.cluster_for("a") == "fast"
    assert config.cluster_for("other") == "slow"


def _with(path: str, value: Any) -> dict[str, Any]:
    """GOOD_CONFIG with the value at a dotted path replaced (None deletes it)."""
    import copy

    data = copy.deepcopy(GOOD_CONFIG)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("not a mapping", "storage config: expected a mapping"),
        (_with("storage_clusters", None), "storage_clusters: missing"),
        (_with("storage_clusters", ["x"]), "storage_clusters: expected a mapping"),
        (_with("storage_clusters.fast.extra", 1), "storage_clusters.fast.extra: unknown key"),
        (_with("storage_clusters.fast.servers", None), "storage_clusters.fast.servers: missing"),
        (_with("storage_clusters.fast.servers", 5), "storage_clusters.fast.servers: expected"),
        (
            _with("storage_clusters.fast.servers", ["h:1", "junk"]),
            "storage_clusters.fast.servers[1]: storage address 'junk'",
        ),
        (
            _with("storage_clusters.fast.servers", ["h:1", "h:2"]),
            "storage_clusters.fast.servers: 2 servers given, k+m = 6 needed",
        ),
        (
            _with("storage_clusters.fast.servers", [f"h:{1 + i % 5}" for i in range(6)]),
            "storage address 'h:1' is given twice",
        ),
        (_with("vdisks", ["a"]), "vdisks: expected a mapping"),
        (_with("vdisks.a.foo", "bar"), "vdisks.a.foo: unknown key"),
        (_with("vdisks.a", {}), "vdisks.a.storage_cluster: missing"),
        (_with("vdisks.a.storage_cluster", "nope"), "vdisks.a.storage_cluster: unknown storage"),
        (_with("default_storage_cluster", "nope"), "default_storage_cluster: unknown storage"),
    ],
)
def test_parse_storage_config_bad(data: Any, message: str) -> None:
    with pytest.raises(StorageConfigError) as info:
        parse_storage_config(data, required=6)
    assert message in str(info.value)


def test_parse_storage_config_optional_sections() -> None:
    config = parse_storage_config({"storage_clusters": GOOD_CONFIG["storage_clusters"]})
    assert config.vdisks == {} and config.default_cluster is None


def test_load_storage_config(tmp_path: Path) -> None:
    path = tmp_path / "tlog.yaml"
    path.write_text(
        "storage_clusters:\n"
        "  main:\n"
        "    servers: ['127.0.0.1:6379', '127.0.0.1:6380', '[::1]:6381@2']\n"
        "vdisks:\n"
        "  img: {storage_cluster: main}\n"
    )
    config = load_storage_config(str(path), required=3)
    assert config.clusters["main"][2] == ServerAddress("::1", 6381, 2)
    assert config.vdisks == {"img": "main"}

    with pytest.raises(StorageConfigError, match=f"{path}: storage_clusters.main.servers: 3"):
        load_storage_config(str(path), required=6)
    path.write_text("storage_clusters: [unclosed\n")
    with pytest.raises(StorageConfigError, match=f"{path}: invalid YAML"):
        load_storage_config(str(path))
    path.write_text("")
    with pytest.raises(StorageConfigError, match=f"{path}: empty"):
        load_storage_config(str(path))
    with pytest.raises(StorageConfigError, match="missing.yaml: cannot read"):
        load_storage_config(str(tmp_path / "missing.yaml"))


# ---------------------------------------------------------------------------------------------
# Servers: the same semantics for Redis and memory


ServerMaker = Callable[[], StorageServer]


@pytest.fixture(params=["redis", "memory"])
def make_server(request: pytest.FixtureRequest) -> Iterator[ServerMaker]:
    """A factory of fresh servers of one kind, all on one redis-server for the redis kind."""
    if request.param == "memory":
        yield MemoryStorageServer
        return
    factory: RedisFactory = request.getfixturevalue("redis_factory")
    (server,) = factory(1)
    yield lambda: RedisStorageServer(addr(server))


def test_store_and_read_back(make_server: ServerMaker) -> None:
    async def scenario() -> None:
        server = make_server()
        key = last_hash_key("vd")
        await server.store([(b"h1", b"piece-1")], key, [b"h1"])
        await server.store([(b"h2", b"piece-2"), (b"h3", b"piece-3")], key, [b"h2", b"h3"])
        assert await server.get(b"h2") == b"piece-2"
        assert await server.get(b"missing") is None
        assert await server.get_many([b"h1", b"nope", b"h3"]) == [b"piece-1", None, b"piece-3"]
        assert await server.get_many([]) == []
        # push[-1] ends at the head: newest first
        assert await server.list_range(key) == [b"h3", b"h2", b"h1"]
        assert await server.list_range(b"no such list") == []
        await server.ping()
        await server.close()

    run(scenario())


def test_store_compare_and_set_of_the_head(make_server: ServerMaker) -> None:
    async def scenario() -> None:
        server = make_server()
        key = last_hash_key("cas")
        await server.store([(b"h1", b"p1")], key, [b"h1"], expect_head=b"")  # no list yet
        await server.store([(b"h2", b"p2")], key, [b"h2"], expect_head=b"h1")
        # Another writer's view: the head is not h1 any more. The list is left alone (the
        # values may have been written: a Redis server gets them before the compare-and-set;
        # unreachable, unless they are records already on the chain).
        with pytest.raises(HeadMoved) as refused:
            await server.store([(b"h3", b"p3"), (b"m", b"x")], key, [b"h3"], expect_head=b"h1")
        assert refused.value.head == b"h2" and "moved" in str(refused.value)
        assert await server.list_range(key) == [b"h2", b"h1"]
        with pytest.raises(HeadMoved) as refused:
            await server.store([], last_hash_key("none"), [b"x"], expect_head=b"h2")
        assert refused.value.head == b""
        # Many items and hashes in one go, trimmed as a plain store is.
        items = [(b"k%d" % i, b"v%d" % i) for i in range(100)]
        await server.store(items, key, [b"a", b"b", b"c"], keep=4, expect_head=b"h2")
        assert await server.list_range(key) == [b"c", b"b", b"a", b"h2"]
        assert await server.get(b"k99") == b"v99"
        await server.close()

    run(scenario())


def test_a_server_that_stops_running_the_script_is_stored_without_it(
        redis_factory: RedisFactory) -> None:
    """The compare-and-set written at once (`store_soon`) on a server whose ACL stopped
    allowing scripts fails as ScriptRefused (the flusher then stores again through
    `store`), and `store` goes on with the plain commands there."""
    (proc,) = redis_factory(1)

    async def scenario() -> None:
        server = RedisStorageServer(addr(proc))
        key = last_hash_key("acl")
        await server.store([(b"h1", b"p1")], key, [b"h1"], expect_head=b"")  # script cached
        proc.client().execute_command("ACL", "SETUSER", "default", "-evalsha", "-eval")
        soon = server.store_soon([(b"h2", b"p2")], key, [b"h2"], b"h1")
        assert soon is not None
        with pytest.raises(ScriptRefused):
            await soon
        await server.store([(b"h2", b"p2")], key, [b"h2"], expect_head=b"h1")
        assert await server.list_range(key) == [b"h2", b"h1"]
        assert await server.get(b"h2") == b"p2"
        assert server.store_soon([(b"h3", b"p3")], key, [b"h3"], b"h2") is None
        await server.close()

    run(scenario())


def test_store_trims_to_keep(make_server: ServerMaker) -> None:
    async def scenario() -> None:
        server = make_server()
        key = last_hash_key("trim")
        for i in range(10):
            await server.store([(b"k%d" % i, b"v")], key, [b"%d" % i])
        assert await server.list_range(key) == [b"%d" % i for i in range(9, 3, -1)]
        assert LAST_HASH_KEEP == 6
        await server.store([], key, [b"a", b"b", b"c"], keep=2)
        assert await server.list_range(key) == [b"c", b"b"]
        # nothing to push: the list is left alone
        await server.store([(b"x", b"y")], key, [])
        assert await server.list_range(key) == [b"c", b"b"]
        assert await server.get(b"x") == b"y"
        with pytest.raises(ValueError):
            await server.store([], key, [b"a"], keep=0)
        await server.close()

    run(scenario())


def test_set_many_and_big_values(make_server: ServerMaker) -> None:
    """Values small and big (written as buffers of their own, views too) read back."""
    async def scenario() -> None:
        server = make_server()
        blobs = [(os.urandom(32), os.urandom(25_000 + i)) for i in range(5)]
        await server.set_many(blobs)
        await server.set_many([])
        assert await server.get_many([k for k, _ in blobs]) == [v for _, v in blobs]
        big = os.urandom(3 * BIG_ARG)
        views: list[tuple[bytes, bytes | memoryview]] = [
            (b"big", big), (b"view", memoryview(big)[BIG_ARG:]), (b"small", b"s")]
        await server.set_many(views)
        assert await server.get_many([b"big", b"view", b"small"]) == [
            big, big[BIG_ARG:], b"s"]
        await server.store(views[:2], last_hash_key("big"), [b"big", b"view"])
        await server.store([(b"one", memoryview(big))], last_hash_key("big"), [b"one"])
        assert await server.get(b"one") == big
        assert await server.list_range(last_hash_key("big")) == [b"one", b"view", b"big"]
        await server.close()

    run(scenario())


def test_big_arguments_are_packed_as_buffers_of_their_own() -> None:
    big = os.urandom(BIG_ARG)
    view = memoryview(bytearray(os.urandom(BIG_ARG + 1)))
    commands = [(b"MSET", b"k1", big, b"k2", b"v2", b"k3", view), (b"LPUSH", b"l", 7)]
    parts = pack_command_parts(commands)
    assert len(parts) == 5 and parts[1] is big and bytes(parts[3]) == bytes(view)
    expected = (b"*7\r\n$4\r\nMSET\r\n$2\r\nk1\r\n$%d\r\n" % BIG_ARG + big
                + b"\r\n$2\r\nk2\r\n$2\r\nv2\r\n$2\r\nk3\r\n$%d\r\n" % (BIG_ARG + 1)
                + bytes(view) + b"\r\n*3\r\n$5\r\nLPUSH\r\n$1\r\nl\r\n$1\r\n7\r\n")
    assert b"".join(parts) == expected == pack_commands(commands)
    small = [(b"SET", b"k", b"v" * (BIG_ARG - 1))]
    assert pack_command_parts(small) == [pack_commands(small)]


def test_wrong_type_is_a_storage_error(make_server: ServerMaker) -> None:
    async def scenario() -> None:
        server = make_server()
        await server.set_many([(b"plain", b"value")])
        with pytest.raises(StorageError, match="WRONGTYPE"):
            await server.store([(b"k", b"v")], b"plain", [b"h"])
        assert await server.get(b"k") == b"v"  # not a transaction: the SET went through
        with pytest.raises(StorageError, match="WRONGTYPE"):
            await server.list_range(b"plain")
        # the connection is still usable after a command error
        await server.store([], b"list", [b"h"])
        with pytest.raises(StorageError, match="WRONGTYPE"):
            await server.get(b"list")
        assert await server.get_many([b"list", b"plain"]) == [None, b"value"]
        await server.close()

    run(scenario())


def test_concurrent_stores_keep_call_order(make_server: ServerMaker) -> None:
    """Calls started in order land in order, even when all are in flight together."""

    async def scenario() -> None:
        server = make_server()
        key = last_hash_key("order")
        await asyncio.gather(
            *(server.store([(b"same", b"%d" % i)], key, [b"%d" % i], keep=500) for i in range(300))
        )
        assert await server.get(b"same") == b"299"
        assert await server.list_range(key) == [b"%d" % i for i in range(299, -1, -1)]
        await server.close()

    run(scenario())


# ---------------------------------------------------------------------------------------------
# Redis specifics


def test_db_selection(redis_factory: RedisFactory) -> None:
    (proc,) = redis_factory(1)

    async def scenario() -> None:
        server = RedisStorageServer(addr(proc, db=1))
        assert server.address == f"{proc.address}@1"
        await server.store([(b"hash", b"piece")], last_hash_key("v"), [b"hash"])
        await server.close()

    run(scenario())
    assert proc.client(db=0).get(b"hash") is None
    assert proc.client(db=0).exists(b"last_hash_v") == 0
    assert proc.client(db=1).get(b"hash") == b"piece"
    assert proc.client(db=1).lrange(b"last_hash_v", 0, -1) == [b"hash"]


def test_server_down_and_back(redis_factory: RedisFactory) -> None:
    (proc,) = redis_factory(1)
    server = RedisStorageServer(addr(proc), socket_timeout=2.0)

    async def store(i: int) -> None:
        await server.store([(b"k%d" % i, b"v")], b"list", [b"%d" % i])

    async def scenario() -> None:
        await store(1)
        proc.stop()
        for i in (2, 3):  # fails while down, on the old connection and on reconnecting
            with pytest.raises(StorageError) as info:
                await store(i)
            assert proc.address in str(info.value)
        proc.start()
        await store(4)
        await server.close()
        with pytest.raises(StorageError, match="closed"):
            await store(5)
        await server.close()  # idempotent

    run(scenario())
    assert proc.client().lrange(b"list", 0, -1) == [b"4"]  # a restarted server is empty


def test_unreachable_server_error_names_address(redis_factory: RedisFactory) -> None:
    (proc,) = redis_factory(1)
    proc.stop()

    async def scenario() -> None:
        server = RedisStorageServer(addr(proc, db=2), socket_timeout=1.0)
        with pytest.raises(StorageError, match=f"storage server {proc.address}@2: cannot connect"):
            await server.ping()
        await server.close()

    run(scenario())


def test_in_flight_calls_fail_when_server_dies(redis_factory: RedisFactory) -> None:
    (proc,) = redis_factory(1, enable_debug_command="local")

    async def scenario() -> None:
        server = RedisStorageServer(addr(proc), socket_timeout=5.0)
        await server.ping()
        # DEBUG SLEEP holds the server; the stores queue up behind it on the same connection
        slow = asyncio.create_task(server._execute([(b"DEBUG", b"SLEEP", b"0.3")]))
        stores = [asyncio.create_task(server.store([(b"k", b"v")], b"l", [b"h"])) for _ in range(5)]
        await asyncio.sleep(0.05)
        proc.stop()
        results = await asyncio.gather(slow, *stores, return_exceptions=True)
        assert all(isinstance(r, StorageError) for r in results), results
        await server.close()

    run(scenario())


def test_reply_timeout(redis_factory: RedisFactory) -> None:
    (proc,) = redis_factory(1, enable_debug_command="local")

    async def scenario() -> None:
        server = RedisStorageServer(addr(proc), socket_timeout=0.2)
        await server.ping()
        with pytest.raises(StorageError, match="no reply within 0.2 s"):
            await server._execute([(b"DEBUG", b"SLEEP", b"0.5")])
        await asyncio.sleep(0.4)
        await server.ping()  # a new connection once the server answers again
        await server.close()

    run(scenario())


def test_cancelled_caller_does_not_desync(redis_factory: RedisFactory) -> None:
    (proc,) = redis_factory(1)

    async def scenario() -> None:
        server = RedisStorageServer(addr(proc))
        await server.set_many([(b"a", b"1"), (b"b", b"2")])
        task = asyncio.create_task(server.get(b"a"))
        await asyncio.sleep(0)  # sent, reply not read yet
        task.cancel()
        assert await server.get(b"b") == b"2"
        assert await server.get(b"a") == b"1"
        await server.close()

    run(scenario())


# ---------------------------------------------------------------------------------------------
# Pools and factories


def test_pool_size_checked() -> None:
    servers = [MemoryStorageServer() for _ in range(5)]
    with pytest.raises(StorageConfigError, match="5 storage servers given, k\\+m = 6 needed"):
        StoragePool(servers, 4, 2)
    pool = StoragePool(servers, 3, 2)
    assert pool.is_memory and pool.k == 3 and pool.m == 2
    run(pool.close())


def test_static_factory(redis6: list[RedisProcess]) -> None:
    factory = StaticPoolFactory([addr(p) for p in redis6], 4, 2)
    assert not factory.is_memory
    assert factory.describe().startswith("6 redis servers 127.0.0.1:")
    assert factory.describe().endswith("(k=4, m=2)")
    pool = factory.pool_for("a")
    assert factory.pool_for("b") is pool
    assert not pool.is_memory

    async def scenario() -> None:
        await asyncio.gather(
            *(
                s.store([(b"hash", b"piece%d" % i)], b"l", [b"hash"])
                for i, s in enumerate(pool.servers)
            )
        )
        await pool.close()  # a factory's pool leaves the shared clients open
        await pool.servers[0].ping()
        await factory.close()
        with pytest.raises(StorageError, match="closed"):
            await pool.servers[0].ping()

    run(scenario())
    for i, proc in enumerate(redis6):
        assert proc.client().get(b"hash") == b"piece%d" % i


def test_describe_sequential_ports() -> None:
    factory = StaticPoolFactory(parse_addresses("127.0.0.1:6379", 6), 4, 2)
    assert factory.describe() == "6 redis servers 127.0.0.1:6379..6384 (k=4, m=2)"
    factory = StaticPoolFactory(parse_addresses("a:1,b:1", 2), 1, 1)
    assert factory.describe() == "2 redis servers a:1, b:1 (k=1, m=1)"
    with pytest.raises(StorageConfigError, match="3 storage servers given"):
        StaticPoolFactory(parse_addresses("a:1", 3), 1, 1)


def test_cluster_factory(redis_factory: RedisFactory) -> None:
    procs = redis_factory(4)
    config = StorageConfig(
        clusters={
            "one": [addr(procs[0]), addr(procs[1])],
            "two": [addr(procs[2]), addr(procs[1]), addr(procs[3])],  # shares procs[1]
        },
        vdisks={"va": "one", "vb": "two"},
    )
    factory = ClusterPoolFactory(config, 1, 1, source="tlog.yaml")
    assert not factory.is_memory
    assert "tlog.yaml" in factory.describe() and "2 clusters" in factory.describe()
    pool_a, pool_b = factory.pool_for("va"), factory.pool_for("vb")
    assert [s.address for s in pool_a.servers] == [procs[0].address, procs[1].address]
    # only the first k+m servers of a bigger cluster are used; clients shared per address
    assert [s.address for s in pool_b.servers] == [procs[2].address, procs[1].address]
    assert pool_a.servers[1] is pool_b.servers[1]
    with pytest.raises(StorageConfigError, match="'vc': no storage cluster"):
        factory.pool_for("vc")

    async def scenario() -> None:
        await pool_a.servers[0].store([(b"h", b"a")], b"l", [b"h"])
        await pool_b.servers[0].store([(b"h", b"b")], b"l", [b"h"])
        factory.update(StorageConfig(config.clusters, {"va": "two"}, default_cluster="one"))
        assert factory.pool_for("va").servers[0].address == procs[2].address
        assert factory.pool_for("vc").servers[0].address == procs[0].address
        assert await pool_a.servers[0].get(b"h") == b"a"  # old pools keep working
        await factory.close()

    run(scenario())
    assert procs[0].client().get(b"h") == b"a"
    assert procs[2].client().get(b"h") == b"b"
    with pytest.raises(StorageError, match="closed"):
        factory.pool_for("va")

    with pytest.raises(StorageConfigError, match="unknown storage cluster 'zzz'"):
        factory.update(StorageConfig(config.clusters, {"va": "zzz"}))
    with pytest.raises(StorageConfigError, match="storage_clusters.one.servers: 2 servers given"):
        ClusterPoolFactory(config, 2, 1)


def test_memory_factory() -> None:
    factory = MemoryPoolFactory(4, 2)
    assert factory.is_memory
    assert factory.describe() == "6 in-memory storage servers (k=4, m=2)"
    pool = factory.pool_for("x")
    assert pool is factory.pool_for("y") and pool.is_memory and len(pool.servers) == 6

    async def scenario() -> None:
        await pool.servers[5].store([(b"h", b"p")], last_hash_key("x"), [b"h"])
        assert await factory.pool_for("z").servers[5].get(b"h") == b"p"
        await factory.close()

    run(scenario())


def test_any_pool_factory(tmp_path: Path) -> None:
    path = tmp_path / "tlog.yaml"
    path.write_text(
        "storage_clusters:\n  c:\n    servers: [h:1, h:2, h:3]\ndefault_storage_cluster: c\n"
    )
    static = any_pool_factory(k=2, m=1, addresses="127.0.0.1:7000", config_path=str(path))
    assert isinstance(static, StaticPoolFactory)
    assert static.describe() == "3 redis servers 127.0.0.1:7000..7002 (k=2, m=1)"
    with pytest.raises(StorageConfigError, match="1 storage servers given"):
        any_pool_factory(k=2, m=1, addresses=["h:1"], autofill=False)

    cluster = any_pool_factory(k=2, m=1, addresses="", config_path=str(path))
    assert isinstance(cluster, ClusterPoolFactory)
    assert cluster.pool_for("anything").servers[0].address == "h:1"
    with pytest.raises(StorageConfigError, match="tlog.yaml: storage_clusters.c.servers: 3"):
        any_pool_factory(k=4, m=2, config_path=str(path))

    assert isinstance(any_pool_factory(k=4, m=2), MemoryPoolFactory)
    with pytest.raises(StorageConfigError, match="no storage given: "):
        any_pool_factory(k=4, m=2, allow_memory=False)
    with pytest.raises(StorageConfigError, match="k=0"):
        any_pool_factory(k=0, m=2)


def test_fixture_restart_keeps_port(redis_factory: RedisFactory) -> None:
    (proc,) = redis_factory(1, maxmemory="10mb")
    port = proc.port
    assert proc.client().config_get("maxmemory") == {"maxmemory": "10485760"}
    proc.stop()
    assert not proc.running
    proc.start()
    assert proc.port == port and proc.client().ping()
