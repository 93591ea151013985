"""The metrics of `tlog nbd --config` at one /metrics: the supervisor's own per vdisk (up,
state, starts) and each vdisk process's (`tlog.nbd.metrics`: bytes, EIOs, flush latency,
recoveries...), fetched from it when scraped and labelled with its vdisk."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from tlog.client import parse_address

#: Seconds a vdisk process' /metrics may take to answer a scrape.
FETCH_TIMEOUT = 2.0
STATES = ("starting", "serving", "waiting", "stopping", "stopped")
#: Straight to the loopback port, whatever proxy the environment names.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class VdiskProcess(Protocol):
    """What the supervisor knows of a vdisk's process (`tlog.nbd.host.Child`)."""

    vdisk: str
    state: str
    starts: int
    metrics_port: int


class HostCollector(Collector):
    """Read from the supervisor and its vdisk processes when scraped."""

    def __init__(self, children: Callable[[], Sequence[VdiskProcess]],
                 source_up: Callable[[], bool]) -> None:
        self.children = children
        self.source_up = source_up

    def collect(self) -> Iterator[Metric]:
        children = self.children()
        up = GaugeMetricFamily("tlog_nbd_vdisk_up", "1 when the vdisk's process serves it.",
                               labels=["vdisk"])
        state = GaugeMetricFamily("tlog_nbd_vdisk_state", "The vdisk process' state (1 for "
                                  "the one it is in).", labels=["vdisk", "state"])
        starts = CounterMetricFamily("tlog_nbd_vdisk_starts", "Starts of the vdisk's process "
                                     "(more than one: it ended and was started again).",
                                     labels=["vdisk"])
        for child in children:
            up.add_metric([child.vdisk], int(child.state == "serving"))
            for name in STATES:
                state.add_metric([child.vdisk, name], int(child.state == name))
            starts.add_metric([child.vdisk], child.starts)
        yield up
        yield state
        yield starts
        yield GaugeMetricFamily("tlog_nbd_config_source_up", "0 while the config source "
                                "cannot be read (the vdisks are served as they are).",
                                value=int(self.source_up()))
        merged: dict[str, Metric] = {}
        for child in children:
            if child.state != "serving" or not child.metrics_port:
                continue
            try:
                with _OPENER.open(f"http://127.0.0.1:{child.metrics_port}/metrics",
                                  timeout=FETCH_TIMEOUT) as answer:
                    text = answer.read().decode()
            except (OSError, urllib.error.URLError):
                continue  # stopping or restarting: its up and state say so
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(family.name, Metric(family.name,
                                                             family.documentation,
                                                             family.type))
                for sample in family.samples:
                    labels = {**sample.labels, "vdisk": child.vdisk}
                    into.add_sample(sample.name, labels, sample.value, sample.timestamp)
        yield from merged.values()


def serve_host_metrics(address: str, children: Callable[[], Sequence[VdiskProcess]],
                       source_up: Callable[[], bool]) -> None:
    """Serve ``/metrics`` on ``address`` (host:port) from a daemon thread."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(children, source_up))
    name, port = parse_address(address)
    start_http_server(port, name, registry=registry)
