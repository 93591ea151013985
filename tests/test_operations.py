"""Operations: metrics and health over real HTTP, structured logs, config reload on SIGHUP.

Servers run in this process on real sockets or as real subprocesses, on real redis-server
storage; metrics are scraped with a plain HTTP client and parsed with prometheus-client's
own exposition parser.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tlog.protocol import ClientConnection
from tlog.protocol.status import BlockStatus, HandshakeStatus
from tlogserver.config import ConfigError, ServerConfig, from_sources
from tlogserver.logs import ContextLogger, JsonFormatter, TextFormatter
from tlogserver.server import TlogServer

from .serverproc import ServerProcess, pick_port, storage_args
from .wireclient import KEY, WireClient, chain_blocks, port_of, read_chain, running_server

WAIT = 15.0
#: A marker inside every block's data: it must never show up in a log.
MARKER = b"BLOCKDATA-must-not-be-logged"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 90))


def block_data(seq: int) -> bytes:
    head = MARKER + seq.to_bytes(8, "little")
    return head + hashlib.sha256(head).digest() * ((4096 - len(head)) // 32) + bytes(
        (4096 - len(head)) % 32)


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def _get_sync(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with _opener.open(request, timeout=WAIT) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    """One real HTTP request, from a thread: the server may run on this very loop."""
    return await asyncio.to_thread(_get_sync, port, path, method)


async def scrape(port: int) -> Samples:
    status, text = await http_get(port, "/metrics")
    assert status == 200, text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported"
    return samples[key]


def metrics_port(server: TlogServer) -> int:
    return int(server.metrics_sockets[0].getsockname()[1])


async def eventually(probe: Callable[[], Awaitable[Any]], check: Callable[[Any], bool],
                     what: str, timeout: float = WAIT) -> Any:
    """Probe until ``check`` holds (bounded); for states only visible by asking again."""
    deadline = time.monotonic() + timeout
    while True:
        got = await probe()
        if check(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {got!r}")
        await asyncio.sleep(0.05)


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_count_blocks_and_the_histograms_move(redis6: list[Any]) -> None:
    addresses = [r.address for r in redis6]

    async def scenario() -> None:
        async with running_server(addresses, metrics_address="127.0.0.1:0") as server:
            mport = metrics_port(server)
            before = await scrape(mport)
            assert value(before, "tlog_received_blocks_total") == 0
            assert value(before, "tlog_recv_ok_latency_seconds_count") == 0
            assert value(before, "tlog_flush_latency_seconds_count") == 0
            assert value(before, "tlog_connections") == 0

            client = await WireClient.connect(port_of(server))
            for seq in range(100):
                client.send(seq, block_data(seq))
            await client.wait_flushed(range(100))
            client.send(10, block_data(10))  # a resend of a stored block
            client.write(ClientConnection.send_block(100, 100, 100, block_data(100),
                                                     hash=bytes(32)))
            client.send(150, block_data(150))  # ahead of 100: buffered
            await client.wait_for(lambda: len(client.responses(BlockStatus.RECV_OK)) == 102
                                  and client.responses(BlockStatus.RECV_FAILED) == [(100,)],
                                  "answers to the resend, the bad hash and the early block")
            mid = await scrape(mport)
            assert value(mid, "tlog_received_blocks_total") == 103
            assert value(mid, "tlog_received_bytes_total") > 103 * 4096
            assert value(mid, "tlog_duplicate_blocks_total") == 1
            assert value(mid, "tlog_recv_failed_blocks_total", reason="hash") == 1
            assert value(mid, "tlog_recv_failed_blocks_total", reason="window") == 0
            assert value(mid, "tlog_flushed_blocks_total") == 100
            assert value(mid, "tlog_aggregations_stored_total") == 4
            assert value(mid, "tlog_flushed_bytes_total") > 0
            assert value(mid, "tlog_flush_failed_blocks_total") == 0
            assert value(mid, "tlog_erasure_fallback_encodes_total") == 0
            assert value(mid, "tlog_connections") == 1
            assert value(mid, "tlog_vdisks_open") == 1
            assert value(mid, "tlog_vdisk_clients", vdisk="vd") == 1
            assert value(mid, "tlog_vdisk_out_of_order_blocks", vdisk="vd") == 1
            assert value(mid, "tlog_vdisk_out_of_order_bytes", vdisk="vd") == 4096
            assert value(mid, "tlog_vdisk_pending_blocks", vdisk="vd") == 0
            assert value(mid, "tlog_vdisk_flush_lag_sequences", vdisk="vd") == 0
            # the histograms moved: one RecvOK observation per read, one flush per aggregation
            assert value(mid, "tlog_recv_ok_latency_seconds_count") >= 1
            assert value(mid, "tlog_recv_ok_latency_seconds_sum") > 0
            assert value(mid, "tlog_recv_ok_latency_seconds_bucket", le="+Inf") == value(
                mid, "tlog_recv_ok_latency_seconds_count")
            assert value(mid, "tlog_flush_latency_seconds_count") == 4
            assert 1 <= value(mid, "tlog_flush_round_seconds_count") <= 4
            assert value(mid, "tlog_flush_round_seconds_sum") > 0
            assert not any(name == "tlog_storage_errors_total" for name, _ in mid)

            for seq in range(100, 105):  # fewer than flush-size: they wait
                client.send(seq, block_data(seq))
            await client.wait_for(lambda: len(client.responses(BlockStatus.RECV_OK)) == 107,
                                  "RecvOK for 100..104")
            pending = await scrape(mport)
            assert value(pending, "tlog_vdisk_pending_blocks", vdisk="vd") == 5
            assert value(pending, "tlog_vdisk_flush_lag_sequences", vdisk="vd") == 5
            assert value(pending, "tlog_vdisk_oldest_pending_seconds", vdisk="vd") > 0
            assert value(pending, "tlog_recv_ok_latency_seconds_count") > value(
                mid, "tlog_recv_ok_latency_seconds_count")
            await client.close()
            await eventually(lambda: scrape(mport),
                             lambda s: value(s, "tlog_connections") == 0, "connection gone")

    run(scenario())


def test_a_stall_of_the_event_loop_shows_in_the_lag_histogram() -> None:
    """``tlog_event_loop_lag_seconds``: the server's probe wakes every 100 ms and observes
    how late it woke. The loop held for 300 ms (here, on purpose) makes one wake-up at
    least 200 ms late: its timer was due within 100 ms of the stall's start and could only
    fire after the stall."""
    async def scenario() -> None:
        async with running_server(memory_storage=True, metrics_address="127.0.0.1:0") as server:
            mport = metrics_port(server)
            await eventually(
                lambda: scrape(mport), lambda s: value(s, "tlog_event_loop_lag_seconds_count") >= 2,
                "the probe's first wake-ups")
            time.sleep(0.3)  # the stall: the loop runs nothing meanwhile
            after = await eventually(
                lambda: scrape(mport),
                lambda s: value(s, "tlog_event_loop_lag_seconds_count") > value(
                    s, "tlog_event_loop_lag_seconds_bucket", le="0.1"),
                "a wake-up later than 100 ms")
            assert value(after, "tlog_event_loop_lag_seconds_sum") >= 0.2
            assert server.lag_probe.max >= 0.2

    run(scenario())


def test_storage_errors_are_counted_per_server(redis6: list[Any]) -> None:
    addresses = [r.address for r in redis6]
    down, down2 = redis6[2], redis6[3]  # two down: fewer than the k+1 pieces a flush needs

    async def scenario() -> None:
        async with running_server(addresses, metrics_address="127.0.0.1:0") as server:
            mport = metrics_port(server)
            client = await WireClient.connect(port_of(server))
            client.send(0, block_data(0))
            client.write(ClientConnection.send_force_flush(0))
            await client.wait_flushed([0])
            down.stop()
            down2.stop()
            for seq in range(1, 26):
                client.send(seq, block_data(seq))
            await client.wait_for(lambda: bool(client.responses(BlockStatus.FLUSH_FAILED)),
                                  "FlushFailed")
            failing = await scrape(mport)
            assert value(failing, "tlog_storage_errors_total", server=down.address) >= 1
            assert value(failing, "tlog_storage_degraded_pieces_total",
                         server=down.address) >= 1
            others = {dict(labels)["server"] for name, labels in failing
                      if name == "tlog_storage_errors_total"}
            assert others == {down.address, down2.address}
            assert value(failing, "tlog_flush_failed_blocks_total") >= 25
            assert value(failing, "tlog_vdisk_storage_failing", vdisk="vd") == 1
            assert value(failing, "tlog_vdisk_pending_blocks", vdisk="vd") == 25
            down.start()
            down2.start()
            await client.wait_flushed(range(1, 26))
            back = await scrape(mport)
            assert value(back, "tlog_vdisk_storage_failing", vdisk="vd") == 0
            assert value(back, "tlog_flushed_blocks_total") == 26
            assert value(back, "tlog_vdisk_pending_blocks", vdisk="vd") == 0
            await client.close()

    run(scenario())


def test_health_and_readiness_follow_storage(redis6: list[Any]) -> None:
    addresses = [r.address for r in redis6]
    down = redis6[4]

    async def scenario() -> None:
        async with running_server(addresses, metrics_address="127.0.0.1:0") as server:
            mport = metrics_port(server)
            assert await http_get(mport, "/healthz") == (200, "ok\n")
            assert await http_get(mport, "/readyz") == (200, "ready\n")
            down.stop()
            status, body = await eventually(lambda: http_get(mport, "/readyz"),
                                            lambda got: got[0] == 503, "/readyz to fail")
            assert "storage unreachable" in body and down.address in body
            for other in addresses:
                if other != down.address:
                    assert other not in body
            assert (await http_get(mport, "/healthz"))[0] == 200  # alive all the same
            down.start()
            await eventually(lambda: http_get(mport, "/readyz"), lambda got: got[0] == 200,
                             "/readyz to recover")
            assert (await http_get(mport, "/nothing"))[0] == 404
            assert (await http_get(mport, "/metrics", method="POST"))[0] == 405
            assert await http_get(mport, "/healthz", method="HEAD") == (200, "")
            # A client that sends garbage or nothing useful does not disturb the endpoint.
            reader, writer = await asyncio.open_connection("127.0.0.1", mport)
            writer.write(b"\x16\x03\x01 not http\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), WAIT)).startswith(b"HTTP/1.1 400")
            writer.close()
            assert (await http_get(mport, "/readyz"))[0] == 200

    run(scenario())


def test_readiness_is_off_once_stopping_and_the_endpoint_closes_after() -> None:
    async def scenario() -> None:
        async with running_server(metrics_address="127.0.0.1:0") as server:
            mport = metrics_port(server)
            assert await http_get(mport, "/readyz") == (200, "ready\n")
            server.request_stop()  # what SIGTERM does before the drain
            assert await http_get(mport, "/readyz") == (503, "shutting down\n")
            assert (await http_get(mport, "/healthz"))[0] == 200
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", mport)

    run(scenario())


# -- logs --------------------------------------------------------------------------------------


def test_json_logs_parse_carry_the_vdisk_and_never_hold_keys_or_data(redis6: list[Any],
                                                                       tmp_path: Path) -> None:
    addresses = [r.address for r in redis6]
    log_file = tmp_path / "tlogserver.log"
    server = ServerProcess(*storage_args(addresses), "--log-format", "json", "--log-level",
                           "debug", "--log-file", str(log_file))

    async def scenario() -> None:
        client = await WireClient.connect(server.port, vdisk="vd-json")
        for seq in range(30):
            client.send(seq, block_data(seq))
        client.write(ClientConnection.send_block(30, 30, 30, block_data(30), hash=bytes(32)))
        client.write(ClientConnection.send_force_flush(29))
        await client.wait_flushed(range(30))
        await client.wait_for(lambda: bool(client.responses(BlockStatus.RECV_FAILED)),
                              "RecvFailed")
        await client.close()

    with server:
        run(scenario())
        server.wait_for_log(r'"msg": "disconnected"')
        assert server.terminate() == 0
    output = server.output()
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert entries and all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    assert {e["level"] for e in entries} >= {"debug", "info", "warning"}
    handshake = [e for e in entries if e["msg"].startswith("handshake")]
    assert len(handshake) == 1
    assert handshake[0]["vdisk"] == "vd-json"
    assert handshake[0]["conn"].startswith("conn#") and handshake[0]["peer"].startswith(
        "127.0.0.1:")
    bad = [e for e in entries if "wrong hash" in e["msg"]]
    assert len(bad) == 1 and bad[0]["vdisk"] == "vd-json" and bad[0]["level"] == "warning"
    after = entries[entries.index(handshake[0]):]
    of_the_connection = [e for e in after if e.get("conn") == handshake[0]["conn"]]
    assert len(of_the_connection) >= 3  # handshake, bad hash, disconnected
    assert all(e.get("vdisk") == "vd-json" for e in of_the_connection)
    file_text = log_file.read_text()
    assert file_text.splitlines() == output.splitlines()
    for text in (output, file_text):
        assert KEY not in text and KEY.encode().hex() not in text
        assert MARKER.decode() not in text and MARKER.hex() not in text


def test_text_logs_put_the_context_first() -> None:
    record_log = logging.getLogger("tests.operations")
    handler = _Capture()
    record_log.addHandler(handler)
    record_log.setLevel(logging.DEBUG)
    record_log.propagate = False
    try:
        adapter = ContextLogger(record_log, conn="conn#7", peer="10.0.0.1:5")
        adapter.bind(vdisk="vm-1")
        adapter.info("closing: %s", "bye")
        adapter.warning("storage: %s", "down", extra={"server": "10.0.0.9:6379"})
        try:
            raise ValueError("boom")
        except ValueError:
            adapter.exception("failed")
    finally:
        record_log.removeHandler(handler)
    text = [TextFormatter().format(r) for r in handler.records]
    assert text[0].endswith("INFO tests.operations: [vdisk=vm-1 conn=conn#7 peer=10.0.0.1:5] "
                            "closing: bye")
    assert "[vdisk=vm-1 conn=conn#7 peer=10.0.0.1:5 server=10.0.0.9:6379] storage: down" in text[1]
    as_json = [json.loads(JsonFormatter().format(r)) for r in handler.records]
    assert as_json[1]["server"] == "10.0.0.9:6379" and as_json[1]["level"] == "warning"
    assert "ValueError: boom" in as_json[2]["exc"]
    assert as_json[0]["ts"].endswith("Z") and "T" in as_json[0]["ts"]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# -- config file and reload --------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("metrics_address: nonsense\n", "metrics-address: expected host:port"),
    ("metrics_address: 127.0.0.1:99999\n", "metrics-address: port 99999 out of range"),
    ("log_format: xml\n", "log-format: must be text or json"),
    ("log_level: loud\n", "log-level: must be one of"),
    ("log_level: 3\n", "log-level"),
])
def test_new_options_are_validated_by_name(tmp_path: Path, text: str, message: str) -> None:
    cfg_file = tmp_path / "tlog.yaml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        from_sources({"config": str(cfg_file)}, explicit=set())


def _write_config(path: Path, clusters: dict[str, list[str]], vdisks: dict[str, str],
                  **options: Any) -> None:
    data: dict[str, Any] = {"k": 2, "m": 1, "priv_key": KEY, "flush_time": 300, **options,
                            "storage_clusters": {n: {"servers": s} for n, s in clusters.items()},
                            "vdisks": {v: {"storage_cluster": c} for v, c in vdisks.items()}}
    path.write_text(yaml.safe_dump(data))


def test_sighup_maps_new_vdisks_while_a_client_keeps_sending(redis_factory: Any,
                                                             tmp_path: Path) -> None:
    redis = redis_factory(6)
    cluster_a = [r.address for r in redis[:3]]
    cluster_b = [r.address for r in redis[3:]]
    cfg_file = tmp_path / "tlog.yaml"
    _write_config(cfg_file, {"a": cluster_a}, {"vdA": "a"}, flush_size=25)
    server = ServerProcess("--config", str(cfg_file))

    async def scenario() -> None:
        a = await WireClient.connect(server.port, vdisk="vdA")
        for seq in range(50):
            a.send(seq, block_data(seq))
        await a.wait_flushed(range(50))
        refused = await WireClient.connect(server.port, vdisk="vdB")
        assert refused.handshake.status == HandshakeStatus.INVALID_VDISK_ID  # not mapped yet
        await refused.close()
        for seq in range(50, 60):  # fewer than flush-size 25: they wait in the vdisk
            a.send(seq, block_data(seq))
        await a.wait_for(lambda: len(a.responses(BlockStatus.RECV_OK)) == 60, "RecvOK x60")

        _write_config(cfg_file, {"a": cluster_a, "b": cluster_b}, {"vdA": "a", "vdB": "b"},
                      flush_size=10, max_message_size=256 * 1024, log_level="debug",
                      priv_key="abcdefghijabcdefghijabcdefghij12")
        assert server.pid is not None
        os.kill(server.pid, signal.SIGHUP)
        line = await asyncio.to_thread(server.wait_for_log, "config reloaded", WAIT)
        assert "flush_size 25 -> 10" in line and "storage map" in line
        assert "log_level 'info' -> 'debug'" in line
        # The new flush size applies to the open vdisk: its 10 pending blocks are cut at once.
        await a.wait_flushed(range(50, 60))
        for seq in range(60, 100):
            a.send(seq, block_data(seq))
        await a.wait_flushed(range(60, 100))
        assert not a.closed  # the same connection all along
        groups = a.responses(BlockStatus.FLUSH_OK)
        assert groups[-5:] == [tuple(range(s, s + 10)) for s in range(50, 100, 10)]

        b = await WireClient.connect(server.port, vdisk="vdB")
        assert b.handshake.status == HandshakeStatus.OK
        for seq in range(20):
            b.send(seq, block_data(seq))
        await b.wait_flushed(range(20))
        await b.close()
        # The new log level applies too: debug lines (a client leaving) show up now.
        await asyncio.to_thread(server.wait_for_log, r"\[vdisk=vdB .*\] disconnected", WAIT)
        await a.close()

    with server:
        run(scenario())
        restart_lines = [line for line in server.output().splitlines()
                         if "only after a restart" in line]
        assert any("max_message_size 131072 -> 262144" in line for line in restart_lines)
        assert any("priv_key (changed)" in line for line in restart_lines)
        server.terminate()
    assert [s for s, _, _ in chain_blocks(read_chain(cluster_a, "vdA", k=2, m=1))] == list(
        range(100))
    assert [s for s, _, _ in chain_blocks(read_chain(cluster_b, "vdB", k=2, m=1))] == list(
        range(20))
    for r in redis[:3]:  # nothing of vdB went to cluster a
        assert not r.client().exists("last_hash_vdB")
    output = server.output()
    assert "[vdisk=vdA conn=conn#" in output  # text lines carry the context too
    assert KEY not in output and "abcdefghijabcdefghijabcdefghij12" not in output


def test_sighup_with_a_broken_file_changes_nothing(redis_factory: Any, tmp_path: Path) -> None:
    redis = redis_factory(3)
    cluster = [r.address for r in redis]
    cfg_file = tmp_path / "tlog.yaml"
    _write_config(cfg_file, {"a": cluster}, {"vdA": "a"}, flush_size=5)
    mport = pick_port()
    server = ServerProcess("--config", str(cfg_file), "--metrics-address", f"127.0.0.1:{mport}")
    broken = [
        ("flush_sise: 3\nvdisks: {vdB: {storage_cluster: a}}\n", "unknown key 'flush_sise'"),
        ("flush_size: [\n", "not valid YAML"),
        (None, "vdisks.vdB.storage_cluster: unknown storage cluster 'nope'"),
        (None, "flush-size: must be a whole number >= 1"),
    ]

    async def scenario() -> None:
        a = await WireClient.connect(server.port, vdisk="vdA")
        for seq in range(5):
            a.send(seq, block_data(seq))
        await a.wait_flushed(range(5))
        assert server.pid is not None
        for text, message in broken:
            if text is not None:
                cfg_file.write_text(text)
            elif "nope" in message:
                _write_config(cfg_file, {"a": cluster}, {"vdA": "a"}, flush_size=2)
                data = yaml.safe_load(cfg_file.read_text())
                data["vdisks"]["vdB"] = {"storage_cluster": "nope"}
                cfg_file.write_text(yaml.safe_dump(data))
            else:
                _write_config(cfg_file, {"a": cluster}, {"vdA": "a", "vdB": "a"}, flush_size=0)
            os.kill(server.pid, signal.SIGHUP)
            line = await asyncio.to_thread(
                server.wait_for_log, "config reload rejected.*" + re.escape(message), WAIT)
            assert "keeping the running config" in line
        samples = await scrape(mport)
        assert value(samples, "tlog_config_reload_failures_total") == len(broken)
        assert value(samples, "tlog_config_reloads_total") == 0
        assert value(samples, "tlog_config_last_reload_successful") == 0
        # Still flush-size 5, still the old map, still the same connection.
        for seq in range(5, 10):
            a.send(seq, block_data(seq))
        await a.wait_flushed(range(5, 10))
        assert a.responses(BlockStatus.FLUSH_OK)[-1] == tuple(range(5, 10))
        b = await WireClient.connect(server.port, vdisk="vdB")
        assert b.handshake.status == HandshakeStatus.INVALID_VDISK_ID
        await b.close()
        assert not a.closed
        await a.close()

    with server:
        run(scenario())
        server.terminate()
    assert KEY not in server.output()


def test_reload_in_process_applies_what_it_can(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with running_server(flush_size=25) as server:
            client = await WireClient.connect(port_of(server))
            for seq in range(7):
                client.send(seq, block_data(seq))
            await client.wait_for(lambda: len(client.events) == 8, "RecvOK x7")
            new = ServerConfig(address="127.0.0.1:0", flush_time=30.0, flush_size=7, k=3,
                               max_buffered_blocks=10, log_level="debug").validate()
            assert server.reload(new)
            await client.wait_flushed(range(7))  # cut by the smaller flush size
            assert server.config.flush_size == 7 and server.config.max_buffered_blocks == 10
            assert server.config.k == 4  # needs a restart
            assert server.vdisks["vd"]._window == 10
            client.send(100, block_data(100))  # beyond the new window of 10
            await client.wait_for(lambda: client.responses(BlockStatus.RECV_FAILED) == [(100,)],
                                  "RecvFailed beyond the reloaded window")
            await client.close()

    with caplog.at_level("INFO"):
        run(scenario())
    assert "config reloaded: flush_size 25 -> 7" in caplog.text
    assert "k 4 -> 3: takes effect only after a restart" in caplog.text


def test_a_reload_that_does_not_hold_together_changes_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    """The config a reload runs on is built whole and validated before anything changes.
    Here the new flush size and window could apply, but the retention policy that comes
    with them cannot on the running legacy format (the format needs a restart): none of it
    applies, where setting the options one by one used to apply the first ones."""
    async def scenario() -> None:
        async with running_server(flush_size=25, storage_format="legacy", priv_key=KEY,
                                  nonce="ab" * 12) as server:
            running = server.config
            before = copy.deepcopy(running)
            client = await WireClient.connect(port_of(server))
            for seq in range(7):
                client.send(seq, block_data(seq))
            await client.wait_for(lambda: len(client.events) == 8, "RecvOK x7")
            new = ServerConfig(address="127.0.0.1:0", flush_time=30.0, flush_size=7,
                               max_buffered_blocks=10, retention_keep_sequences=100).validate()
            assert not server.reload(new)
            assert server.config is running and running == before
            assert server.stats.reloads_failed == 1 and server.stats.reloads_ok == 0
            client.send(100, block_data(100))  # within the running window, not the new one
            await client.wait_for(lambda: (100,) in client.responses(BlockStatus.RECV_OK),
                                  "RecvOK in the running window")
            # The same file without the policy: it applies (the 7 blocks are cut at once).
            fixed = ServerConfig(address="127.0.0.1:0", flush_time=30.0, flush_size=7,
                                 max_buffered_blocks=10).validate()
            assert server.reload(fixed)
            await client.wait_flushed(range(7))
            assert server.config.flush_size == 7 and server.config.storage_format == "legacy"
            assert running == before  # a new config, the old one untouched
            await client.close()

    with caplog.at_level("INFO"):
        run(scenario())
    assert ("config reload rejected, keeping the running config: retention: the legacy "
            "storage format cannot hold checkpoints") in caplog.text
    assert "config reloaded: flush_size 25 -> 7, max_buffered_blocks 16384 -> 10" in caplog.text
