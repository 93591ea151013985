"""The server's counters: plain numbers and lock-free histograms the write path adds to,
read by the Prometheus collector (`tlogserver.metrics`) when scraped."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client.utils import floatToGoString

#: RecvOK is answered within the read that carried the block: tens of microseconds.
RECV_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: One pipelined storage round, or an aggregation's wait from cut to stored.
FLUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0, 30.0, 60.0)
#: How late the event loop's lateness probe woke (`tlogserver.looplag`): well under a
#: millisecond when nothing holds the loop.
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
               5.0)


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
                 "recv_failed_server", "recv_failed_operation", "epochs_started",
                 "flushed_blocks", "flushed_bytes",
                 "aggregations_stored", "flush_failed_blocks", "storage_errors",
                 "degraded_pieces", "recv_latency", "flush_round", "flush_latency", "loop_lag",
                 "reloads_ok", "reloads_failed", "last_reload_ok", "last_reload_time",
                 "handshakes_refused", "compactions", "compacted_records", "compacted_bytes")

    def __init__(self) -> None:
        self.connections_accepted = 0
        #: connections closed at accept: over --max-connections
        self.connections_refused = 0
        self.received_blocks = 0
        self.received_bytes = 0
        self.duplicate_blocks = 0
        self.recv_failed_hash = 0
        self.recv_failed_operation = 0  # an unknown operation, or a range that cannot be
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
        #: how late each wake-up of the event loop's lateness probe came
        self.loop_lag = Histogram(LAG_BUCKETS)
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload_ok = True
        self.last_reload_time = 0.0
        #: per HandshakeStatus name (lower case): handshakes answered with that error
        self.handshakes_refused: dict[str, int] = {}
        #: retention: compaction runs by result ("ok", "nothing" to do, "failed"), and what
        #: the successful ones removed (aggregations; stored bytes, every piece counted)
        self.compactions: dict[str, int] = {}
        self.compacted_records = 0
        self.compacted_bytes = 0

    def epoch_started(self, reason: str) -> None:
        self.epochs_started[reason] = self.epochs_started.get(reason, 0) + 1

    def compaction_ran(self, result: str) -> None:
        self.compactions[result] = self.compactions.get(result, 0) + 1

    def handshake_refused(self, status: str) -> None:
        """A handshake was answered with the error ``status`` (e.g. "unauthorized")."""
        self.handshakes_refused[status] = self.handshakes_refused.get(status, 0) + 1

    def storage_failed(self, server: str, pieces: int) -> None:
        """One request to ``server`` failed, and with it the ``pieces`` it was to store."""
        self.storage_errors[server] = self.storage_errors.get(server, 0) + 1
        self.degraded_pieces[server] = self.degraded_pieces.get(server, 0) + pieces
