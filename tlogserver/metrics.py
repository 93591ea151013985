"""Prometheus metrics, kept as plain integers on the hot path and exported at scrape time.

The write path never calls into prometheus-client: connections, vdisks and
flushers add to the plain attributes of one `ServerStats` per server (once per
read or per storage round, never per block beyond an increment), and a custom
collector turns those and the live state of the vdisks into metric families
when ``/metrics`` is scraped. Each server has its own `CollectorRegistry`, so
several servers in one process (tests) do not share numbers.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tlog.protocol.version import CURRENT_VERSION

if TYPE_CHECKING:
    from .server import TlogServer

#: RecvOK is answered within the read that carried the block: tens of microseconds.
RECV_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: One pipelined storage round, or an aggregation's wait from cut to stored.
FLUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Bucket counts without locks or per-observation objects; exported by the collector."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs as the exposition format wants them."""
        out = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((floatToGoString(bound), float(total)))
        return out


class ServerStats:
    """Every counter of one server, as plain numbers the write path adds to."""

    __slots__ = ("connections_accepted", "connections_refused", "received_blocks",
                 "received_bytes", "duplicate_blocks",
                 "recv_failed_hash", "recv_failed_window", "recv_failed_pending",
                 "recv_failed_server", "epochs_started",
                 "flushed_blocks", "flushed_bytes",
                 "aggregations_stored", "flush_failed_blocks", "storage_errors",
                 "degraded_pieces", "recv_latency", "flush_round", "flush_latency",
                 "reloads_ok", "reloads_failed", "last_reload_ok", "last_reload_time",
                 "handshakes_refused")

    def __init__(self) -> None:
        self.connections_accepted = 0
        #: connections closed at accept: over --max-connections
        self.connections_refused = 0
        self.received_blocks = 0
        self.received_bytes = 0
        self.duplicate_blocks = 0
        self.recv_failed_hash = 0
        self.recv_failed_window = 0
        self.recv_failed_pending = 0
        #: refused because the whole server holds --max-server-buffered-bytes
        self.recv_failed_server = 0
        #: per reason ("reset": resetFirstSequence; "reused_sequence": a client started its
        #: numbering again without it; "far_resend"): new epochs begun
        self.epochs_started: dict[str, int] = {}
        self.flushed_blocks = 0
        self.flushed_bytes = 0
        self.aggregations_stored = 0
        self.flush_failed_blocks = 0
        #: per storage server address: failed requests, and pieces those requests held
        self.storage_errors: dict[str, int] = {}
        self.degraded_pieces: dict[str, int] = {}
        self.recv_latency = Histogram(RECV_BUCKETS)
        self.flush_round = Histogram(FLUSH_BUCKETS)
        self.flush_latency = Histogram(FLUSH_BUCKETS)
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload_ok = True
        self.last_reload_time = 0.0
        #: per HandshakeStatus name (lower case): handshakes answered with that error
        self.handshakes_refused: dict[str, int] = {}

    def epoch_started(self, reason: str) -> None:
        self.epochs_started[reason] = self.epochs_started.get(reason, 0) + 1

    def handshake_refused(self, status: str) -> None:
        """A handshake was answered with the error ``status`` (e.g. "unauthorized")."""
        self.handshakes_refused[status] = self.handshakes_refused.get(status, 0) + 1

    def storage_failed(self, server: str, pieces: int) -> None:
        """One request to ``server`` failed, and with it the ``pieces`` it was to store."""
        self.storage_errors[server] = self.storage_errors.get(server, 0) + 1
        self.degraded_pieces[server] = self.degraded_pieces.get(server, 0) + pieces


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], hist.buckets(), hist.sum)
    return family


class ServerCollector(Collector):
    """Reads a `TlogServer`'s stats and live vdisks when scraped (on the event loop)."""

    def __init__(self, server: TlogServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        s = server.stats
        info = GaugeMetricFamily("tlog_build_info", "Package and protocol version of this "
                                 "tlogserver.", labels=["version", "protocol"])
        info.add_metric([_package_version(), str(CURRENT_VERSION)], 1)
        yield info
        yield _gauge("tlog_connections", "Client connections open now.", len(server.connections))
        yield _counter("tlog_connections_accepted", "Client connections accepted.",
                       s.connections_accepted)
        yield _counter("tlog_connections_refused", "Client connections closed at accept: "
                       "--max-connections were open.", s.connections_refused)
        yield _gauge("tlog_buffered_bytes", "Bytes of blocks all vdisks hold together (out of "
                     "order, or not stored yet); --max-server-buffered-bytes bounds it.",
                     server.budget.used)
        epochs = CounterMetricFamily("tlog_epochs_started", "New epochs of a vdisk's sequence "
                                     "numbering, by reason: reset (resetFirstSequence), "
                                     "reused_sequence (a client started again below the "
                                     "stored log), far_resend.", labels=["reason"])
        for reason in sorted(s.epochs_started):
            epochs.add_metric([reason], s.epochs_started[reason])
        yield epochs
        yield _gauge("tlog_vdisks_open", "Vdisks with an open chain in this server.",
                     len(server.vdisks))
        refused = CounterMetricFamily("tlog_handshakes_refused", "Handshakes refused, by "
                                      "status: unauthorized (access rules), invalid_vdisk_id, "
                                      "invalid_version, internal_server_error.",
                                      labels=["status"])
        for status in sorted(s.handshakes_refused):
            refused.add_metric([status], s.handshakes_refused[status])
        yield refused
        yield _counter("tlog_received_blocks", "Blocks received, resends included.",
                       s.received_blocks)
        yield _counter("tlog_received_bytes", "Bytes read from client connections "
                       "(framing included).", s.received_bytes)
        yield _counter("tlog_duplicate_blocks", "Blocks received again (client resends): "
                       "already stored, pending, or buffered.", s.duplicate_blocks)
        failed = CounterMetricFamily("tlog_recv_failed_blocks", "Blocks answered RecvFailed "
                                     "and not kept: bad hash, beyond the out-of-order window, "
                                     "too much not stored yet (storage behind), or the "
                                     "server's buffers full.", labels=["reason"])
        failed.add_metric(["hash"], s.recv_failed_hash)
        failed.add_metric(["window"], s.recv_failed_window)
        failed.add_metric(["pending"], s.recv_failed_pending)
        failed.add_metric(["server_buffer"], s.recv_failed_server)
        yield failed
        yield _counter("tlog_flushed_blocks", "Blocks stored (answered FlushOK).",
                       s.flushed_blocks)
        yield _counter("tlog_flushed_bytes", "Bytes of the aggregations stored (compressed and "
                       "encrypted, before erasure coding).", s.flushed_bytes)
        yield _counter("tlog_aggregations_stored", "Aggregations stored.",
                       s.aggregations_stored)
        yield _counter("tlog_flush_failed_blocks", "Blocks answered FlushFailed (each failed "
                       "attempt counts; they are retried).", s.flush_failed_blocks)
        errors = CounterMetricFamily("tlog_storage_errors", "Failed requests to a storage "
                                     "server.", labels=["server"])
        degraded = CounterMetricFamily("tlog_storage_degraded_pieces", "Erasure-coded pieces a "
                                       "storage server failed to store.", labels=["server"])
        for address in sorted(s.storage_errors):
            errors.add_metric([address], s.storage_errors[address])
            degraded.add_metric([address], s.degraded_pieces.get(address, 0))
        yield errors
        yield degraded
        yield _histogram("tlog_recv_ok_latency_seconds", "From a read to its answers "
                         "(RecvOK) being written, per read.", s.recv_latency)
        yield _histogram("tlog_flush_round_seconds", "One storage round: every piece of up "
                         "to 64 aggregations written to every server.", s.flush_round)
        yield _histogram("tlog_flush_latency_seconds", "From an aggregation being cut to it "
                         "being stored (queueing and retries included).", s.flush_latency)
        yield from self._vdisks()
        yield _counter("tlog_config_reloads", "Successful config reloads (SIGHUP).",
                       s.reloads_ok)
        yield _counter("tlog_config_reload_failures", "Rejected config reloads (SIGHUP): the "
                       "old config was kept.", s.reloads_failed)
        yield _gauge("tlog_config_last_reload_successful", "1 if the last config reload was "
                     "applied (or none happened), 0 if it was rejected.", int(s.last_reload_ok))
        yield _gauge("tlog_config_last_reload_timestamp_seconds", "When the last config reload "
                     "was tried, seconds since the epoch (0: never).", s.last_reload_time)

    def _vdisks(self) -> Iterator[Metric]:
        names = ("pending_blocks", "out_of_order_blocks", "out_of_order_bytes",
                 "flush_lag_sequences", "oldest_pending_seconds", "clients", "storage_failing",
                 "epoch")
        docs = {
            "pending_blocks": "Blocks received in order and not stored yet.",
            "out_of_order_blocks": "Blocks received ahead of a missing one, buffered.",
            "out_of_order_bytes": "Bytes of the buffered out-of-order blocks.",
            "flush_lag_sequences": "Sequences between the last received in order and the last "
                                   "stored.",
            "oldest_pending_seconds": "Age of the oldest block not stored yet (0 when none).",
            "clients": "Connections writing to the vdisk.",
            "storage_failing": "1 while the vdisk's last storage round failed (retrying).",
            "epoch": "The vdisk's current epoch (a reset of its sequence numbering starts the "
                     "next).",
        }
        families = {n: GaugeMetricFamily(f"tlog_vdisk_{n}", docs[n], labels=["vdisk"])
                    for n in names}
        now = time.monotonic()
        for vdisk_id, vdisk in sorted(self.server.vdisks.items()):
            values = vdisk.gauges(now)
            for name in names:
                families[name].add_metric([vdisk_id], values[name])
        yield from families.values()


def _package_version() -> str:
    try:
        return metadata.version("tlog")
    except metadata.PackageNotFoundError:
        return "unknown"


def make_registry(server: TlogServer) -> CollectorRegistry:
    """A registry with the server's collector and the process' CPU, memory and descriptors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    ProcessCollector(registry=registry)
    return registry
