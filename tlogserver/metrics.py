"""Prometheus metrics, kept as plain integers on the hot path and exported at scrape time.

The write path never calls into prometheus-client: connections, vdisks and
flushers add to the plain attributes of one `tlogserver.stats.ServerStats` per server (once per
read or per storage round, never per block beyond an increment), and a custom
collector turns those and the live state of the vdisks into metric families
when ``/metrics`` is scraped. Each server has its own `CollectorRegistry`, so
several servers in one process (tests) do not share numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tlog.protocol.version import CURRENT_VERSION
from tlog.record.erasure import fallback_encodes

from .stats import Histogram, ServerStats


class VdiskGauges(Protocol):
    """What the collector reads of an open vdisk."""

    def gauges(self, now: float) -> Mapping[str, float]: ...

def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], hist.buckets(), hist.sum)
    return family


class ServerCollector(Collector):
    """Reads a server's counters and live state when scraped (on the event loop): it is
    given what it reads, so that it needs nothing of the server itself."""

    def __init__(self, stats: ServerStats, connections: Callable[[], int],
                 buffered_bytes: Callable[[], int],
                 vdisks: Callable[[], Mapping[str, VdiskGauges]],
                 slaves: Callable[[], Mapping[str, VdiskGauges]] = dict,
                 logs: Callable[[], Mapping[str, VdiskGauges]] = dict,
                 fleet: Callable[[], Mapping[str, float]] = dict) -> None:
        self.stats = stats
        self.connections = connections
        self.buffered_bytes = buffered_bytes
        self.vdisks = vdisks
        self.slaves = slaves
        self.logs = logs
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        info = GaugeMetricFamily("tlog_build_info", "Package and protocol version of this "
                                 "tlogserver.", labels=["version", "protocol"])
        info.add_metric([_package_version(), str(CURRENT_VERSION)], 1)
        yield info
        yield _gauge("tlog_connections", "Client connections open now.", self.connections())
        yield _counter("tlog_connections_accepted", "Client connections accepted.",
                       s.connections_accepted)
        yield _counter("tlog_connections_refused", "Client connections closed at accept: "
                       "--max-connections were open.", s.connections_refused)
        yield _gauge("tlog_buffered_bytes", "Bytes of blocks all vdisks hold together (out of "
                     "order, or not stored yet); --max-server-buffered-bytes bounds it.",
                     self.buffered_bytes())
        epochs = CounterMetricFamily("tlog_epochs_started", "New epochs of a vdisk's sequence "
                                     "numbering, by reason: reset (resetFirstSequence), "
                                     "reused_sequence (a client started again below the "
                                     "stored log), far_resend.", labels=["reason"])
        for reason in sorted(s.epochs_started):
            epochs.add_metric([reason], s.epochs_started[reason])
        yield epochs
        yield _gauge("tlog_vdisks_open", "Vdisks with an open chain in this server.",
                     len(self.vdisks()))
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
                                     "and not kept: bad hash, an unknown operation or a range "
                                     "that cannot be, beyond the out-of-order window, "
                                     "too much not stored yet (storage behind), or the "
                                     "server's buffers full.", labels=["reason"])
        failed.add_metric(["hash"], s.recv_failed_hash)
        failed.add_metric(["operation"], s.recv_failed_operation)
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
        yield _counter("tlog_erasure_fallback_encodes", "Erasure encodes that pyeclib "
                       "failed and the numpy coder did instead (same pieces, about 8 times "
                       "the CPU; the first is logged).", fallback_encodes())
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
        yield _histogram("tlog_event_loop_lag_seconds", "How late a timer on the server's "
                         "event loop fires (sampled every 100 ms): CPU work holding the loop "
                         "delays every client's answers by as much.", s.loop_lag)
        yield from self._vdisks()
        compactions = CounterMetricFamily("tlog_compactions", "Compaction runs of the vdisks' "
                                          "retention policies, by result: ok, nothing (to "
                                          "compact), failed (tried again later).",
                                          labels=["result"])
        for result in ("ok", "nothing", "failed"):
            compactions.add_metric([result], s.compactions.get(result, 0))
        yield compactions
        yield _counter("tlog_compacted_aggregations", "Aggregations deleted by compactions "
                       "(replaced by checkpoints).", s.compacted_records)
        yield _counter("tlog_compacted_bytes", "Stored bytes freed by compactions (every "
                       "piece on every server).", s.compacted_bytes)
        yield _counter("tlog_config_reloads", "Successful config reloads (SIGHUP).",
                       s.reloads_ok)
        yield _counter("tlog_config_reload_failures", "Rejected config reloads (SIGHUP): the "
                       "old config was kept.", s.reloads_failed)
        yield _gauge("tlog_config_last_reload_successful", "1 if the last config reload was "
                     "applied (or none happened), 0 if it was rejected.", int(s.last_reload_ok))
        yield _gauge("tlog_config_last_reload_timestamp_seconds", "When the last config reload "
                     "was tried, seconds since the epoch (0: never).", s.last_reload_time)
        yield from self._fleet()

    def _fleet(self) -> Iterator[Metric]:
        """With an etcd config source: etcd and the ownership lease."""
        fleet = self.fleet()
        if "config_source_up" in fleet:
            yield _gauge("tlog_config_source_up", "1 while the etcd config source answers; 0 "
                         "while it cannot be reached (the last good config runs).",
                         fleet["config_source_up"])
        if "ownership_lease_held" in fleet:
            yield _gauge("tlog_ownership_lease_held", "1 while this server holds its etcd "
                         "lease (renewed within --owner-lease-ttl); 0: it owns no vdisk and "
                         "takes none on.", fleet["ownership_lease_held"])
            yield _counter("tlog_ownership_leases_lost", "Leases given up because they could "
                           "not be renewed for a TTL (every open vdisk was given up).",
                           fleet["ownership_leases_lost"])
            yield _gauge("tlog_vdisks_owned", "Vdisks whose etcd ownership key this server "
                         "holds.", fleet["vdisks_owned"])

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
        for vdisk_id, vdisk in sorted(self.vdisks().items()):
            values = vdisk.gauges(now)
            for name in names:
                families[name].add_metric([vdisk_id], values[name])
        yield from families.values()
        yield from self._slaves(now)
        yield from self._logs(now)

    def _logs(self, now: float) -> Iterator[Metric]:
        docs = {
            "log_records": "Aggregations in the vdisk's stored log (from the head back to its "
                           "checkpoint), as last measured plus those stored since.",
            "log_bytes": "Stored bytes of the vdisk's log: every piece on every server, "
                         "checkpoint included.",
            "log_oldest_restorable_age_seconds": "Age of the oldest point the vdisk can be "
                                                 "restored to (its checkpoint, or its first "
                                                 "aggregation).",
            "log_last_compaction_timestamp_seconds": "When the vdisk's log was last compacted "
                                                     "by this server (0: never).",
        }
        yield from _per_vdisk(docs, self.logs(), now)

    def _slaves(self, now: float) -> Iterator[Metric]:
        docs = {
            "slave_applied_sequence": "Highest sequence (of the standby's epoch) applied to "
                                      "the vdisk's standby (-1: none or unknown).",
            "slave_lag_blocks": "Blocks stored in the log and not applied to the standby yet.",
            "slave_lag_seconds": "How long the oldest block not applied to the standby has "
                                 "been stored (0: in step).",
            "slave_failing": "1 while the standby cannot be written or the log not read "
                             "(retrying).",
            "slave_ended": "1 once WaitNbdSlaveSync ended slave sync of the vdisk.",
        }
        slaves = self.slaves()
        yield from _per_vdisk(docs, slaves, now)
        lost = CounterMetricFamily("tlog_slave_data_lost", "Times the vdisk's standby was "
                                   "found to have lost what it held (its redis restarted "
                                   "empty): it is rebuilt from the log.", labels=["vdisk"])
        for vdisk_id, source in sorted(slaves.items()):
            lost.add_metric([vdisk_id], source.gauges(now).get("slave_data_lost", 0))
        yield lost


def _per_vdisk(docs: Mapping[str, str], sources: Mapping[str, VdiskGauges],
               now: float) -> Iterator[Metric]:
    """One ``tlog_<name>{vdisk}`` gauge family per name of ``docs``, from each source's
    `gauges`."""
    families = {n: GaugeMetricFamily(f"tlog_{n}", doc, labels=["vdisk"])
                for n, doc in docs.items()}
    for vdisk_id, source in sorted(sources.items()):
        values = source.gauges(now)
        for name, family in families.items():
            family.add_metric([vdisk_id], values[name])
    yield from families.values()


def _package_version() -> str:
    try:
        return metadata.version("tlog")
    except metadata.PackageNotFoundError:
        return "unknown"


def make_registry(collector: ServerCollector) -> CollectorRegistry:
    """A registry with the server's collector and the process' CPU, memory and descriptors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry
