"""The differential wire fuzzer (`tests/fuzz_wire.py`): a short libFuzzer run finds no
difference between `tlog.protocol` as imported and pure copies of its .py files, and the
harness does report a difference or a crash when the two sides are made to disagree.

Which comparison ran is in the test ids (``[compiled-vs-pure]`` or ``[pure-vs-pure]``,
the latter when no compiled module is built), in the output and in the junit properties.
"""

from __future__ import annotations

import collections
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import capnp.lib.capnp
import pytest

from tlog.protocol import ClientConnection, wire

from . import fuzz_wire
from .fuzz_wire import Case, Finding, Harness

ROOT = Path(__file__).resolve().parents[1]
PURE = fuzz_wire.pure_side()
BANNER = fuzz_wire.banner(PURE)
#: What this run compares: the imported modules are compiled, or .py files like the copies.
COMPARED = fuzz_wire.comparison(PURE).replace(" ", "-")
#: An edit of the pure copy that no seed shows (they all send operations 1-3) but a
#: mutated operation byte does.
OPERATION_MASK = ("wire.py", "opword & 0xFF", "opword & 0x7F")
#: One that the seeds show (negative statuses read as unsigned by take_responses).
UNSIGNED_STATUS = ("wire.py", "status = status - 256 if status > 127 else status",
                   "status = status")


def fuzz(tmp_path: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """The harness under libFuzzer in a subprocess, as ``make fuzz`` runs it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "tests.fuzz_wire", *args, "-seed=1",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONHASHSEED": "0"})


def test_seeds_decode_back_to_their_cases_and_cover_every_target() -> None:
    cases = fuzz_wire.seed_cases()
    for case in cases:
        assert fuzz_wire.decode_input(fuzz_wire.encode_input(case)) == case
    assert {c.target for c in cases} == set(fuzz_wire.TARGETS)


def test_the_seeds_reach_every_event_and_error_of_both_connections() -> None:
    """The corpus starts deep: past the handshake, into blocks, commands and responses."""
    seen: collections.Counter[str] = collections.Counter()
    for case in fuzz_wire.seed_cases():
        steps, crash = fuzz_wire.run_side(PURE, case)
        assert crash is None, crash
        for label, how, value in steps:
            if how == "raised":
                seen[f"{value[0]}: {value[1].split(' ')[0]}"] += 1
            elif label in ("receive_data", "buffer_updated"):
                seen.update(event[""] for event in value["items"])
            elif label.startswith("parse_") and value != ("NoneType", None):
                seen[label] += 1
    print(dict(seen))
    for what in ("Handshake", "Block", "ForceFlush", "WaitNbdSlaveSync", "HandshakeResponse",
                 "BlockResponse", "ProtocolError: frame", "ProtocolError: unknown",
                 "FrameError: frame", "parse_block", "parse_response", "parse_frame_header"):
        assert seen[what], what


@pytest.mark.parametrize("compared", [COMPARED])
def test_every_seed_gives_the_same_on_both_sides(compared: str) -> None:
    print(BANNER)
    harness = Harness(fuzz_wire.imported_side(), PURE)
    for case in fuzz_wire.seed_cases():
        harness.check(case)
    assert harness.runs == len(fuzz_wire.seed_cases())


@pytest.mark.parametrize("compared", [COMPARED])
def test_a_fuzz_run_finds_no_difference_and_no_crash(compared: str, tmp_path: Path,
                                                      record_property: Any) -> None:
    runs = 10000
    result = fuzz(tmp_path, f"-runs={runs}", "-print_final_stats=1")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert f"Done {runs} runs" in out
    assert BANNER in result.stdout.splitlines()  # the subprocess compared what we think
    assert "seeds written" in result.stdout
    done = next(line for line in out.splitlines() if "\tDONE " in line)
    print(BANNER)
    print(done)
    record_property("compared", compared)
    record_property("libfuzzer", done)


@pytest.mark.parametrize(("alteration", "case", "expected"), [
    # an operation byte masked: the blocks of the fast path differ
    (OPERATION_MASK,
     Case("server", 0, (), ClientConnection.send_handshake("vd", 0)
          + ClientConnection.send_block(1, 1, 1, b"data", operation=0x81)),
     "difference in server: receive_data ok: [].operation"),
    # an error worded otherwise
    (("connection.py", 'f"unknown message type {mtype}"', 'f"unknown message {mtype}"'),
     Case("server", 8, (3,), ClientConnection.send_handshake("vd", 0) + b"\x07"),
     "difference in server: receive_data raised: value"),
    # a negative status read as unsigned
    (UNSIGNED_STATUS,
     Case("take_responses", 0, (), wire.encode_response(-2, [7, 8])),
     "difference in take_responses: responses ok: [].status"),
    # blocks that alias the caller's buffer instead of copying out of it
    (("wire.py", "buf[data_at - 32:data_at],", "memoryview(buf)[data_at - 32:data_at],"),
     Case("take_blocks", 0, (), ClientConnection.send_block(1, 1, 1, b"data")),
     "difference in take_blocks: blocks ok: [].hash"),
    # an undocumented exception
    (("wire.py", "    if ptrs < 1:\n        return status, []",
      "    if ptrs < 1:\n        raise IndexError('planted')"),
     Case("parse_response", 0, (), struct.pack("<QQ", 1 << 32, 5)),
     "crash in parse_response: pure parse_response: IndexError at wire.py"),
])
def test_an_altered_pure_copy_is_reported(alteration: tuple[str, str, str], case: Case,
                                          expected: str) -> None:
    harness = Harness(fuzz_wire.imported_side(), fuzz_wire.pure_side([alteration]))
    with pytest.raises(Finding) as found:
        harness.check(case)
    print(found.value)
    assert str(found.value).startswith(expected)
    Harness(fuzz_wire.imported_side(), PURE).check(case)  # the unaltered copy agrees


def test_the_fuzzer_finds_an_alteration_no_seed_shows_and_its_input_reproduces_it(
        tmp_path: Path) -> None:
    altered = Harness(fuzz_wire.imported_side(), fuzz_wire.pure_side([OPERATION_MASK]))
    for case in fuzz_wire.seed_cases():
        altered.check(case)  # no seed shows it: the fuzzer has to mutate its way there
    alter = ["--alter", *OPERATION_MASK]
    result = fuzz(tmp_path, *alter, "-runs=100000")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert "Finding: difference in " in out and ".operation" in out, out[-3000:]
    [artifact] = tmp_path.glob("crash-*")
    print(next(line for line in out.splitlines() if line.startswith("Finding:")),
          next(line for line in out.splitlines() if "NEW" in line or "INITED" in line))
    # libFuzzer runs a file given instead of a corpus once: the input shows it again, and
    # only against the altered copy
    again = subprocess.run([sys.executable, "-m", "tests.fuzz_wire", *alter, str(artifact)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "Finding: difference" in again.stdout + again.stderr
    clean = subprocess.run([sys.executable, "-m", "tests.fuzz_wire", str(artifact)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stderr[-2000:]


def test_the_long_run_script_keeps_going_and_sums_up(tmp_path: Path) -> None:
    # an alteration the seeds show at once (negative statuses): this checks the keeping
    # going and the summing up, the test above the search
    result = subprocess.run(
        [sys.executable, "scripts/fuzz_wire.py", "--runs", "3000", "--seed", "1",
         "--corpus", str(tmp_path / "corpus"), "--findings", str(tmp_path / "findings"),
         "--alter", *UNSIGNED_STATUS],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    print(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines()
                 if not line.startswith(("fuzz_wire:", "FINDING", " ")) and ": " in line)
    assert lines["compared"] == BANNER.removeprefix("fuzz_wire: ")
    assert lines["runs"].startswith("3000 in ")  # kept going past the findings
    assert int(lines["coverage"].split()[0]) > 0
    saved = sorted((tmp_path / "findings").glob("finding-difference-*.txt"))
    assert lines["findings"].startswith(f"{len(saved)} new")
    assert saved and all(".status" in p.read_text() for p in saved)


def test_compiled_modules_are_told_apart_from_python_ones() -> None:
    assert fuzz_wire.is_compiled(capnp.lib.capnp)  # pycapnp is a Cython extension
    assert not fuzz_wire.is_compiled(PURE.wire)
    assert PURE.wire.__file__ == str(fuzz_wire.SOURCE_DIR / "wire.py")
    assert PURE.connection.wire is PURE.wire  # the pure connection parses with the pure wire
    assert PURE.wire is not wire
