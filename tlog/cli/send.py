"""`tlog send`: log N blocks to a tlogserver and report throughput and latencies.

Our counterpart of the reference's send_tlog example and the driver of the
benchmarks: block ``i`` of the run gets sequence ``first + i`` and index
``first + i``; once every block is flushed one JSON line is printed. The loop
is kept lean (data prepared up front, latencies recorded as plain floats and
sorted once at the end) so that the figures measure the client and the server,
not this command.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

from tlog.client import (
    DEFAULT_MAX_UNFLUSHED_BYTES,
    DEFAULT_RESEND_TIMEOUT,
    TlogClient,
    TlogClientError,
    parse_address,
    security_options,
)
from tlog.protocol.ranges import RangeError, check_range
from tlog.protocol.status import BlockStatus, Operation

#: How far ahead of its schedule a paced sender (--rate) may run before it sleeps.
PACE_SLACK = 0.001

#: Distinct random blocks cycled through with --random-data (beyond an aggregation's reach
#: for compression, and cheap to prepare).
_RANDOM_POOL_BLOCKS = 1024


def _percentile_ms(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of ``values`` (seconds), in milliseconds."""
    if not values:
        return None
    values.sort()
    rank = min(len(values) - 1, max(0, int(round(fraction * len(values))) - 1))
    return round(values[rank] * 1000, 3)


class _Blocks:
    """The data of block ``i``: compressible (a counter in front of a constant) or random."""

    def __init__(self, block_size: int, random_data: bool) -> None:
        self.block_size = block_size
        self.random = random_data
        if random_data:
            pool = os.urandom(block_size * _RANDOM_POOL_BLOCKS)
            view = memoryview(pool)
            self._pool = [view[i * block_size:(i + 1) * block_size]
                          for i in range(_RANDOM_POOL_BLOCKS)]
        else:
            self._tail = (b"tlog send " * (block_size // 10 + 1))[:max(0, block_size - 8)]

    def __call__(self, i: int) -> bytes | memoryview:
        if self.random:
            return self._pool[i % _RANDOM_POOL_BLOCKS]
        return (i.to_bytes(8, "big") + self._tail)[:self.block_size]


async def run_send(servers: Sequence[str], vdisk_id: str, blocks: int, block_size: int,
                   first_sequence: int | None, random_data: bool, reset: bool, timeout: float,
                   connect_timeout: float, max_unflushed: int,
                   resend_timeout: float, rate: float = 0.0,
                   security: dict[str, Any] | None = None,
                   delete_ranges: Sequence[tuple[int, int]] = ()) -> dict[str, Any]:
    """Send the blocks, wait until all are flushed; the figures of the run.

    ``rate`` > 0 paces the sender to that many blocks per second (0: as fast as the client
    and server go), to measure latencies below saturation. Block ``i`` is due at
    ``i / rate`` seconds after the start; the sender sleeps only when it is at least
    `PACE_SLACK` ahead (event-loop timers have millisecond resolution), so blocks leave in
    small bursts that keep the average exact. ``first_sequence`` None continues the vdisk's
    log where it ends. ``delete_ranges`` (first, count) are logged after the blocks, each
    one range delete where the server takes them (a delete per block otherwise).
    """
    n = blocks
    first = first_sequence or 0  # known once connected when continuing
    sent_at = [0.0] * n
    recv_at = [0.0] * n
    flush_at = [0.0] * n
    clock = time.perf_counter
    recv_ok, flush_ok = BlockStatus.RECV_OK, BlockStatus.FLUSH_OK

    def on_response(status: BlockStatus | int, sequences: Sequence[int]) -> None:
        # the client hands over its BlockStatus members: identity is the cheapest test
        if status is recv_ok:
            table = recv_at
        elif status is flush_ok:
            table = flush_at
        else:
            return
        now = clock()
        for seq in sequences:
            i = seq - first
            if 0 <= i < n and not table[i]:
                table[i] = now

    data_for = _Blocks(block_size, random_data)
    client = await TlogClient.open(servers, vdisk_id, first_sequence, timeout=connect_timeout,
                                   reset_first_sequence=reset, on_response=on_response,
                                   max_unflushed_bytes=max_unflushed,
                                   resend_timeout=resend_timeout, range_ops=True,
                                   **(security or {}))
    first = client.next_sequence
    position = client.log_position
    try:
        send = client.send
        op = Operation.SET
        time_ns = time.time_ns
        cpu0 = time.process_time()
        t0 = clock()
        for i in range(n):
            seq = first + i
            data = data_for(i)
            if rate > 0:
                ahead = t0 + i / rate - clock()
                if ahead >= PACE_SLACK:
                    await asyncio.sleep(ahead)
            sent_at[i] = clock()
            await send(op, seq, seq, time_ns(), data)
        last = first + n - 1
        for range_first, range_count in delete_ranges:
            last = await client.delete_range(last + 1, range_first, range_count)
        if last >= first:
            await client.wait_flushed(last, timeout=timeout)
        seconds = clock() - t0
        cpu = time.process_time() - cpu0
        stats = client.stats()
    finally:
        await client.close()
    recv = [recv_at[i] - sent_at[i] for i in range(n) if recv_at[i]]
    flush = [flush_at[i] - sent_at[i] for i in range(n) if flush_at[i]]
    return {
        "blocks": n,
        "first_sequence": first,
        "epoch": position.epoch if position is not None else 0,
        "block_size": block_size,
        "delete_ranges": len(delete_ranges),
        "range_ops": client.range_ops,
        "last_sequence": last,
        "random_data": random_data,
        "seconds": round(seconds, 4),
        "blocks_per_second": round(n / seconds, 1) if seconds > 0 else None,
        "mb_per_second": round(n * block_size / seconds / 1e6, 2) if seconds > 0 else None,
        "recv_ok_p50_ms": _percentile_ms(recv, 0.50),
        "recv_ok_p99_ms": _percentile_ms(recv, 0.99),
        "flush_ok_p50_ms": _percentile_ms(flush, 0.50),
        "flush_ok_p99_ms": _percentile_ms(flush, 0.99),
        "resends": stats.resends,
        "resent_on_reconnect": stats.reconnect_resends,
        "reconnects": stats.reconnects,
        "cpu_seconds": round(cpu, 4),
        "cpu_us_per_block": round(cpu / n * 1e6, 2) if n else None,
        "server": stats.server,
    }


def _parse_ranges(ctx: click.Context, param: click.Parameter,
                  value: tuple[str, ...]) -> list[tuple[int, int]]:
    out = []
    for text in value:
        first, sep, count = text.partition(":")
        if not sep or not first.isdigit() or not count.isdigit():
            raise click.BadParameter(f"{text!r} is not FIRST:COUNT (block index and count)")
        try:
            check_range(int(first), int(count))
        except RangeError as exc:
            raise click.BadParameter(str(exc)) from None
        out.append((int(first), int(count)))
    return out


def _check_server(ctx: click.Context, param: click.Parameter,
                  value: tuple[str, ...]) -> tuple[str, ...]:
    for address in value:
        try:
            parse_address(address)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


@click.command("send")
@click.option("--server", "servers", multiple=True, required=True, callback=_check_server,
              help="tlogserver HOST:PORT; repeat for failover, in order.")
@click.option("--vdisk", default="tlog-send", show_default=True, help="Vdisk id.")
@click.option("--blocks", type=click.IntRange(min=0), default=10000, show_default=True,
              help="How many blocks to send.")
@click.option("--block-size", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Bytes per block.")
@click.option("--first-sequence", type=click.IntRange(min=0), default=None,
              help="Sequence (and index) of the first block [default: 0].")
@click.option("--continue", "continue_log", is_flag=True,
              help="Start after the vdisk's last sequence, which the server reports.")
@click.option("--random-data", is_flag=True,
              help="Incompressible blocks (default: compressible ones).")
@click.option("--reset", is_flag=True,
              help="Handshake with resetFirstSequence: a new epoch (the server forgets the "
                   "vdisk's order); with --continue, right after the log's last sequence.")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds to wait for the last FlushOK.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait for a first server to accept the handshake.")
@click.option("--max-unflushed", type=click.IntRange(min=1),
              default=DEFAULT_MAX_UNFLUSHED_BYTES, show_default=True,
              help="Bytes of unflushed blocks the client keeps before sending waits.")
@click.option("--resend-timeout", type=float, default=DEFAULT_RESEND_TIMEOUT,
              show_default=True, help="Seconds without RecvOK before a block is sent again.")
@click.option("--rate", type=click.FloatRange(min=0), default=0.0,
              help="Blocks per second to send at (default 0: as fast as possible); for "
                   "latencies below saturation.")
@click.option("--delete-range", "delete_ranges", multiple=True, metavar="FIRST:COUNT",
              callback=_parse_ranges,
              help="After the blocks, log the deletion of COUNT blocks from index FIRST (a "
                   "trim) as one range entry, or a delete per block with a server that "
                   "does not take ranges; repeatable.")
@click.option("--tls", is_flag=True,
              help="Connect with TLS, trusting the system's CAs (or --tls-ca).")
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True),
              help="CA file to trust for the server's certificate (implies --tls).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True),
              help="Client certificate, for servers that map certificates to vdisks.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True),
              help="Key of --tls-cert.")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True),
              help="File holding the vdisk's access token (never given on the command line).")
def send_command(servers: tuple[str, ...], vdisk: str, blocks: int, block_size: int,
                 first_sequence: int | None, continue_log: bool, random_data: bool,
                 reset: bool, timeout: float,
                 connect_timeout: float, max_unflushed: int, resend_timeout: float,
                 rate: float, delete_ranges: list[tuple[int, int]], tls: bool,
                 tls_ca: str | None, tls_cert: str | None, tls_key: str | None,
                 token_file: str | None) -> None:
    """Send N blocks (sequence i at index i) to a tlogserver, wait until all are flushed,
    and print one JSON line: throughput, RecvOK/FlushOK latency percentiles, resends,
    reconnects and the client's CPU time per block. --rate paces the sending;
    --delete-range logs range deletes (trims) after the blocks.
    """
    if continue_log and first_sequence is not None:
        raise click.UsageError("--continue: cannot be combined with --first-sequence")
    if not continue_log and first_sequence is None:
        first_sequence = 0
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        import asyncio
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    try:
        security = security_options(tls=tls, ca_file=tls_ca, cert_file=tls_cert,
                                    key_file=tls_key, token_file=token_file)
        result = runner(run_send(list(servers), vdisk, blocks, block_size, first_sequence,
                                 random_data, reset, timeout, connect_timeout, max_unflushed,
                                 resend_timeout, rate, security, delete_ranges))
    except (OSError, TimeoutError, TlogClientError, ValueError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
