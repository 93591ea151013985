"""`tlog nbd --metrics-address`: the export's metrics for Prometheus, served from a thread
of the plugin (started after nbdkit forks). Read from the disk and its state when scraped:
nothing is counted twice, nothing is kept apart."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from .disk import LoggedDisk


class ExportCollector(Collector):
    """The metrics of the export ``disk()`` serves (nothing before it is open)."""

    def __init__(self, disk: Callable[[], LoggedDisk | None]) -> None:
        self.disk = disk

    def collect(self) -> Iterator[Metric]:
        disk = self.disk()
        if disk is None:
            return
        label = [disk.vdisk]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["vdisk"])
            family.add_metric(label, value)
            return family

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["vdisk"])
            family.add_metric(label, value)
            return family

        yield counter("tlog_nbd_written_blocks", "Blocks written through the export (logged, "
                      "then written to the device); trims and zeroes included.",
                      disk.written_blocks)
        yield counter("tlog_nbd_written_bytes", "Bytes of the blocks written through the "
                      "export (whole blocks, as logged).", disk.written_blocks * disk.block_size)
        flushes = SummaryMetricFamily("tlog_nbd_flush_seconds", "FLUSH requests answered and "
                                      "the seconds they took (log stored, device synced).",
                                      labels=["vdisk"])
        flushes.add_metric(label, count_value=disk.flushes, sum_value=disk.flush_seconds)
        yield flushes
        yield counter("tlog_nbd_failed_requests", "NBD requests answered with an error "
                      "(EIO: the log or the device failed).", disk.failed_requests)
        yield counter("tlog_nbd_checkpoints", "Checkpoints made: writes flushed in the log, "
                      "their block marks cleared (a FLUSH is one, and syncs the device).",
                      disk.checkpoints)
        yield counter("tlog_nbd_device_syncs", "Syncs of the device: FLUSH, FUA and full "
                      "checkpoints (background checkpoints are light while few regions are "
                      "marked).", disk.device_syncs)
        intent, state = disk.intent, disk.state
        if intent is not None:
            yield gauge("tlog_nbd_marked_regions", "4 MiB regions marked in the intent log "
                        "now: what a recovery after a crash of the machine would look at.",
                        intent.marked_regions)
        yield gauge("tlog_nbd_diverged", "1 when the device failed a write the log took: "
                    "the next start logs the device's blocks again.", int(disk.diverged))
        if state is not None:
            last = state.last_recovery
            yield counter("tlog_nbd_recoveries", "Recoveries of this device after an unclean "
                          "stop, over its whole life (kept in its state).", state.recoveries)
            yield gauge("tlog_nbd_last_recovery_blocks", "Blocks the last recovery looked at.",
                        last.get("blocks", 0))
            yield gauge("tlog_nbd_last_recovery_seconds", "How long the last recovery took.",
                        last.get("seconds", 0))
            yield gauge("tlog_nbd_last_recovery_timestamp_seconds", "When the last recovery "
                        "ran (0: never).", last.get("time", 0))
        client = disk.client
        if client is not None:
            stats = client.stats()
            yield gauge("tlog_nbd_unflushed_blocks", "Blocks logged and not stored yet (the "
                        "tlog client holds them).", stats.unflushed_blocks)
            yield counter("tlog_nbd_reconnects", "Reconnections of the tlog client.",
                          stats.reconnects)


def serve_metrics(host: str, port: int, disk: Callable[[], LoggedDisk | None]) -> None:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExportCollector(disk))
    ProcessCollector(registry=registry)
    start_http_server(port, host, registry=registry)
