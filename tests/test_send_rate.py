"""`tlog send --rate`: a paced sender, for latencies below saturation."""

from __future__ import annotations

from tlog.cli.send import PACE_SLACK

from .serverproc import ServerProcess
from .test_send import result_of, tlog_send


def test_paced_send_keeps_its_schedule_and_delivers_everything(
        mem_server: ServerProcess) -> None:
    blocks, rate = 300, 2000.0
    result = result_of(tlog_send("--server", mem_server.address, "--blocks", str(blocks),
                                 "--rate", str(rate)))
    assert result["blocks"] == blocks and result["resends"] == 0
    # Block i leaves no earlier than i / rate after the start (minus the slack the sender
    # may run ahead): a lower bound the pacing guarantees, however fast the machine.
    assert result["seconds"] >= (blocks - 1) / rate - PACE_SLACK


def test_rate_must_not_be_negative(mem_server: ServerProcess) -> None:
    proc = tlog_send("--server", mem_server.address, "--blocks", "1", "--rate", "-5")
    assert proc.returncode == 2 and "--rate" in proc.stderr
