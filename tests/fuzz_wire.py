"""Differential fuzzing of the wire parser: the modules of `tlog.protocol` as imported
(compiled extension modules when they are built, else the .py files) against pure copies
of the same .py files, loaded privately, fed the same hostile bytes.

Both sides must give the same events, the same results and the same errors, and no
exception other than the documented ones (`ProtocolError` from the connections,
`FrameError` from `parse_frame_header`) may escape: anything else is a crash finding.
Without a compiled module it compares pure against pure, which still checks for crashes.

One fuzz input is decoded with atheris's FuzzedDataProvider into a `Case`: a target (what
to drive), an options byte, up to 15 numbers (chunk sizes, offsets) and the payload bytes.

Run: ``python -m tests.fuzz_wire [--findings DIR] [--alter FILE OLD NEW] [libFuzzer
flags] CORPUS_DIR`` from the repository root (seeds are written into an empty corpus
directory); ``scripts/fuzz_wire.py`` drives longer runs and sums them up.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import re
import sys
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import atheris

import tlog.protocol.connection
import tlog.protocol.wire

from .fuzz_wire_seeds import seeds

PACKAGE = "tlog.protocol"
#: The package's .py files, which the pure copies are loaded from.
SOURCE_DIR = Path(tlog.protocol.__path__[0])
#: The targets a fuzz input can pick, by the first byte consumed.
TARGETS = ("server", "client", "frame_header", "take_blocks", "take_responses",
           "parse_block", "parse_response", "encoders")
#: Most numbers (chunk sizes, offsets) one input carries.
MAX_NUMBERS = 15
#: Message size bounds an input can pick (options bits 0-1): the default, the smallest
#: allowed, a small one and a large one.
MAX_SIZES = (tlog.protocol.connection.DEFAULT_MAX_MESSAGE_SIZE, 64, 4096, 1 << 20)
#: The public fields of a Block, compared by value (it is neither a dataclass nor a tuple).
BLOCK_FIELDS = ("sequence", "index", "timestamp", "operation", "hash", "data")
U64 = (1 << 64) - 1

#: A source edit for a pure copy: (file name, old text, new text).
Alteration = tuple[str, str, str]


# -- the two sides -------------------------------------------------------------------


def is_compiled(module: types.ModuleType) -> bool:
    """Whether ``module`` was loaded from an extension module (.so) rather than a .py."""
    return str(getattr(module, "__file__", "") or "").endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES))


class _PureLoader(importlib.abc.Loader):
    """Executes one .py file of the package, optionally edited, optionally instrumented."""

    def __init__(self, path: Path, alterations: Sequence[Alteration], instrument: bool) -> None:
        self.path = path
        self.alterations = alterations
        self.instrument = instrument

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        text = self.path.read_text()
        for name, old, new in self.alterations:
            if name == self.path.name:
                if old not in text:
                    raise ValueError(f"alteration: {old!r} is not in {self.path}")
                text = text.replace(old, new)
        code = compile(text, str(self.path), "exec", dont_inherit=True)
        if self.instrument:  # coverage and comparison feedback for libFuzzer
            code = atheris.patch_code(code, True)
        exec(code, module.__dict__)


class _PureFinder(importlib.abc.MetaPathFinder):
    """Finds ``<prefix>.<name>`` as ``SOURCE_DIR/<name>.py``, whatever else lies beside it:
    the package's relative imports (``from . import wire``) then stay among the copies."""

    def __init__(self, prefix: str, loader_args: tuple[Sequence[Alteration], bool]) -> None:
        self.prefix = prefix
        self.loader_args = loader_args

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        head, _, name = fullname.rpartition(".")
        source = SOURCE_DIR / f"{name}.py"
        if head != self.prefix or not source.is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, source, loader=_PureLoader(source, *self.loader_args))


_copies = itertools.count()


def load_pure(alterations: Sequence[Alteration] = (), instrument: bool = False) -> types.ModuleType:
    """A private package ``_pure<n>_tlog_protocol`` of pure copies of `tlog.protocol`'s .py
    files (not `__init__`), with ``wire`` and ``connection`` (and what they import) loaded.

    Its finder stays installed, scoped to that private name, so that a late import in a
    copy still finds a copy."""
    prefix = f"_pure{next(_copies)}_tlog_protocol"
    spec = importlib.util.spec_from_loader(prefix, loader=None, is_package=True)
    assert spec is not None
    package = importlib.util.module_from_spec(spec)
    package.__path__ = []
    sys.modules[prefix] = package
    sys.meta_path.insert(0, _PureFinder(prefix, (tuple(alterations), instrument)))
    for name in ("wire", "connection"):
        importlib.import_module(f"{prefix}.{name}")
    return package


@dataclasses.dataclass(frozen=True)
class Side:
    """One implementation: its wire and connection modules."""

    name: str
    wire: types.ModuleType
    connection: types.ModuleType


def imported_side() -> Side:
    return Side("imported", tlog.protocol.wire, tlog.protocol.connection)


def pure_side(alterations: Sequence[Alteration] = (), instrument: bool = False) -> Side:
    package = load_pure(alterations, instrument)
    return Side("pure", package.wire, package.connection)


def compared(pure: Side) -> dict[str, str]:
    """For each module the pure copy loaded: how the imported one was loaded, and from where."""
    prefix = pure.wire.__name__.rpartition(".")[0]
    out = {}
    for name in sorted(n for n in sys.modules if n.startswith(prefix + ".")):
        module = sys.modules[f"{PACKAGE}.{name.rpartition('.')[2]}"]
        kind = "compiled" if is_compiled(module) else "pure"
        out[module.__name__] = f"{kind} ({module.__file__})"
    return out


def compiled_modules(pure: Side) -> list[str]:
    """The imported modules that are compiled, of those the pure copy has."""
    return [name for name, how in compared(pure).items() if how.startswith("compiled")]


def comparison(pure: Side) -> str:
    """'compiled vs pure' when any imported module is compiled, else 'pure vs pure'."""
    return "compiled vs pure" if compiled_modules(pure) else "pure vs pure"


def banner(pure: Side) -> str:
    """One line saying what is compared, and which modules are compiled."""
    built = compiled_modules(pure)
    return (f"fuzz_wire: {comparison(pure)}; compiled: {', '.join(built) or 'none'}"
            f" (of {len(compared(pure))})")


# -- inputs ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One decoded fuzz input."""

    target: str
    options: int
    numbers: tuple[int, ...]
    payload: bytes

    @property
    def max_size(self) -> int:
        return MAX_SIZES[self.options & 3]

    @property
    def feed(self) -> int:
        """0: bytes, 1: bytearray, 2: memoryview, 3: the zero-copy path (server only)."""
        return (self.options >> 2) & 3

    def chunks(self) -> list[bytes]:
        """The payload cut at the numbers as chunk sizes; the rest is the last chunk."""
        out, at = [], 0
        for n in self.numbers:
            out.append(self.payload[at:at + n])
            at += n
        out.append(self.payload[at:])
        return out


def decode_input(data: bytes) -> Case:
    """A fuzz input as a Case. FuzzedDataProvider takes integers from the end of the input
    and bytes from its front: the choices are the tail, the payload all the rest."""
    fdp = atheris.FuzzedDataProvider(data)
    target = TARGETS[fdp.ConsumeIntInRange(0, len(TARGETS) - 1)]
    options = fdp.ConsumeIntInRange(0, 255)
    count = fdp.ConsumeIntInRange(0, MAX_NUMBERS)
    numbers = tuple(fdp.ConsumeIntInRange(0, 0xFFFF) for _ in range(count))
    return Case(target, options, numbers, fdp.ConsumeBytes(fdp.remaining_bytes()))


def encode_input(case: Case) -> bytes:
    """The fuzz input `decode_input` turns into ``case`` (for the seed corpus)."""
    tail = [TARGETS.index(case.target), case.options, len(case.numbers)]
    for n in case.numbers:
        tail += [n >> 8, n & 0xFF]  # taken high byte first, from the end
    return case.payload + bytes(reversed(tail))


# -- findings ---------------------------------------------------------------------------


class Finding(Exception):
    """The two sides differ, or an undocumented exception escaped (a crash)."""

    def __init__(self, kind: str, case: Case, signature: str, detail: str) -> None:
        super().__init__(f"{kind} in {case.target}: {signature}\n{detail}\n{describe(case)}")
        self.kind = kind
        self.case = case
        self.signature = f"{kind}:{case.target}:{signature}"


def describe(case: Case) -> str:
    payload = case.payload.hex()
    if len(payload) > 400:
        payload = f"{payload[:400]}... ({len(case.payload)} bytes)"
    return (f"case: target={case.target} options={case.options:#04x} numbers={list(case.numbers)}"
            f" payload={payload}")


class _Crash(Exception):
    """An undocumented exception on one side, with where it came from."""

    def __init__(self, label: str, exc: BaseException) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        at = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        self.signature = f"{label}: {type(exc).__name__} at {at}"
        super().__init__(self.signature)
        self.text = "".join(traceback.format_exception(exc))


#: The native stack pycapnp appends to its errors: "\nstack: 7f... 7f...".
_STACK = re.compile(r"\nstack:[ 0-9a-fx]*$")


class Trace:
    """What one side did for one case: each call's result (kept as is, compared only at the
    end, so that results that alias a reused buffer show it) or documented error."""

    def __init__(self, documented: tuple[type[BaseException], ...]) -> None:
        self.documented = documented
        self.steps: list[tuple[str, str, Any]] = []

    def call(self, label: str, func: Callable[..., Any], *args: Any) -> Any:
        try:
            result = func(*args)
        except self.documented as exc:
            # pycapnp's messages end with the native stack's addresses, which differ when
            # the caller is compiled: they are not part of what is compared
            message = _STACK.sub("", str(exc))
            self.steps.append((label, "raised", (type(exc).__name__, message)))
            return None
        except Exception as exc:
            raise _Crash(label, exc) from exc
        self.steps.append((label, "ok", result))
        return result

    def note(self, label: str, value: Any) -> None:
        self.steps.append((label, "ok", value))


def norm(value: Any) -> Any:
    """A value as plain data, comparable across the two sides' distinct classes. Leaves are
    (type name, value) tuples (enums: class, member, value); dataclasses, named tuples and
    Blocks are dicts of their fields, and sequences dicts of their items, each with its
    type under the key ``""``.

    An IntEnum member is an int here: statuses and operations are typed ``BlockStatus |
    int``, which is int to mypy and so to mypyc, whose compiled code hands out the plain
    number where the pure path hands out the member (equal, and named by the code that
    shows them: tlog.client.errors)."""
    if isinstance(value, enum.IntEnum):
        return ("int", int(value))
    if isinstance(value, enum.Enum):
        return (type(value).__name__, value.name, value.value)
    if isinstance(value, bool | int | str | float | None):
        return (type(value).__name__, value)
    if isinstance(value, bytes | bytearray | memoryview):
        return ("bytes", bytes(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in dataclasses.fields(value)]
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
        names = list(value._fields)
    elif isinstance(value, list | tuple):
        return {"": type(value).__name__, "items": [norm(v) for v in value]}
    elif type(value).__name__ == "Block":
        names = list(BLOCK_FIELDS)
    else:
        return (type(value).__name__, repr(value))
    return {"": type(value).__name__, **{n: norm(getattr(value, n)) for n in names}}


def where(a: Any, b: Any) -> tuple[str, Any, Any]:
    """Where two normalized values first differ, and what each holds there: (``[2].operation``,
    ('int', 1), ('int', 129)); the path is "" when they differ at the top."""
    if isinstance(a, dict) and isinstance(b, dict) and a.get("") == b.get(""):
        for key in a:
            if a[key] != b.get(key):
                path, x, y = where(a[key], b.get(key))
                return ("" if key == "items" else f".{key}") + path, x, y
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                path, x, y = where(x, y)
                return f"[{i}]{path}", x, y
        return f" (length {len(a)} vs {len(b)})", a, b
    return "", a, b


#: List indexes in a `where` path, dropped from a finding's signature.
_INDEX = re.compile(r"\[\d+\]")


def _short(value: Any, limit: int = 600) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# -- targets ----------------------------------------------------------------------------


def _as_feed(case: Case, chunk: bytes) -> bytes | bytearray | memoryview:
    kind = case.feed
    return bytearray(chunk) if kind == 1 else memoryview(chunk) if kind == 2 else chunk


def run_server(side: Side, case: Case, trace: Trace) -> None:
    """`ServerConnection` fed the payload in the case's chunks, by `receive_data` or, when
    the case says so, by the zero-copy `get_buffer`/`buffer_updated` path."""
    conn = side.connection.ServerConnection(case.max_size)
    for chunk in case.chunks():
        if case.feed == 3:
            rest = memoryview(chunk)
            while True:
                room = trace.call("get_buffer", conn.get_buffer, -1)
                n = min(len(room), len(rest))
                room[:n] = rest[:n]
                rest = rest[n:]
                trace.note("room", len(room))
                trace.call("buffer_updated", conn.buffer_updated, n)
                if not rest:
                    break
                if n == 0:
                    raise _Crash("get_buffer", RuntimeError("no room offered for pending bytes"))
        else:
            trace.call("receive_data", conn.receive_data, _as_feed(case, chunk))
        trace.call("state", lambda: (conn.buffered, conn.handshaken, conn.errored))
    # an error found after valid events surfaces on the next call
    trace.call("receive_data", conn.receive_data, b"")


def run_client(side: Side, case: Case, trace: Trace) -> None:
    """`ClientConnection` fed the payload (server output) in the case's chunks."""
    conn = side.connection.ClientConnection(case.max_size)
    for chunk in case.chunks():
        trace.call("receive_data", conn.receive_data, _as_feed(case, chunk))
        trace.call("state", lambda: conn.handshaken)


def _at_end(case: Case) -> tuple[int, int]:
    """An offset and an end within the payload, from the first two numbers."""
    size = len(case.payload)
    at = case.numbers[0] % (size + 1) if case.numbers else case.options >> 4
    at = min(at, size)
    end = size - (case.numbers[1] % (size - at + 1) if len(case.numbers) > 1 else 0)
    return at, end


def run_frame_header(side: Side, case: Case, trace: Trace) -> None:
    at, end = _at_end(case)
    buf = _as_feed(case, case.payload)
    trace.call("parse_frame_header", side.wire.parse_frame_header, buf, at, end - at,
               case.max_size)


def run_take_blocks(side: Side, case: Case, trace: Trace) -> None:
    """`take_blocks` and `take_block`; the buffer is overwritten afterwards, as a caller
    reuses it, before the blocks are compared: they must hold copies."""
    at, end = _at_end(case)
    most = case.numbers[2] - 1 if len(case.numbers) > 2 else -1
    buf = bytearray(case.payload)
    blocks: list[Any] = []
    trace.call("take_blocks", side.wire.take_blocks, buf, at, end, case.max_size, blocks.append,
               most)
    trace.note("blocks", blocks)
    trace.call("take_block", side.wire.take_block, buf, at, end, case.max_size)
    buf[:] = bytes(len(buf))


def run_take_responses(side: Side, case: Case, trace: Trace) -> None:
    at, end = _at_end(case)
    buf = bytearray(case.payload)
    responses: list[Any] = []
    trace.call("take_responses", side.wire.take_responses, buf, at, end, responses.append)
    trace.note("responses", responses)
    buf[:] = bytes(len(buf))


def _segment(case: Case) -> memoryview:
    """The payload as one segment: whole words, as the framing always delivers."""
    return memoryview(case.payload[:len(case.payload) & ~7])


def run_parse_block(side: Side, case: Case, trace: Trace) -> None:
    trace.call("parse_block", side.wire.parse_block, _segment(case))


def run_parse_response(side: Side, case: Case, trace: Trace) -> None:
    trace.call("parse_response", side.wire.parse_response, _segment(case))


def run_encoders(side: Side, case: Case, trace: Trace) -> None:
    """The encoders given the same field values (each within its field's range)."""
    head = case.payload[:44].ljust(44, b"\0")
    seq, last, first, epoch, ts = (int.from_bytes(head[i:i + 8], "little") for i in range(0, 40, 8))
    index = int.from_bytes(head[8:16], "little", signed=True)
    version = int.from_bytes(head[40:44], "little")
    rest = case.payload[44:]
    nums = list(case.numbers) + [0] * 4
    hash_ = rest[:nums[0] % 41]
    data = rest[len(hash_):len(hash_) + nums[1] % (len(rest) + 1)]
    vdisk = rest[:nums[2] % 300].decode("latin-1")
    token = rest[-(nums[3] % 64):] if nums[3] % 64 else None
    sequences = [(seq + i * 0x9E3779B97F4A7C15) & U64 for i in range(nums[1] % 9)]
    op, flags = case.options, nums[2] >> 8
    status = (flags & 0xFF) - 256 if flags & 0x80 else flags & 0x7F
    w = side.wire
    trace.call("encode_block_message", w.encode_block_message, seq, index, ts, op, hash_, data)
    trace.call("encode_block_frame", w.encode_block_frame, seq, index, ts, op, hash_, data)
    trace.call("block_segment_parts", lambda: b"".join(
        w.block_segment_parts(seq, index, ts, op, hash_, data)))
    trace.call("frame", w.frame, data[:len(data) & ~7])
    trace.call("recv_ok", w.recv_ok, seq)
    trace.call("encode_response", w.encode_response, status, sequences)
    trace.call("encode_handshake", w.encode_handshake, version, vdisk, first, bool(flags & 1),
               token, bool(flags & 2), bool(flags & 4))
    trace.call("encode_handshake_response", w.encode_handshake_response, version, status, last,
               bool(flags & 8), epoch, bool(flags & 16), bool(flags & 32))


RUNNERS: dict[str, Callable[[Side, Case, Trace], None]] = {
    "server": run_server, "client": run_client, "frame_header": run_frame_header,
    "take_blocks": run_take_blocks, "take_responses": run_take_responses,
    "parse_block": run_parse_block, "parse_response": run_parse_response,
    "encoders": run_encoders,
}
assert tuple(RUNNERS) == TARGETS


def _documented(side: Side, target: str) -> tuple[type[BaseException], ...]:
    if target in ("server", "client"):
        return (side.connection.ProtocolError,)
    if target == "frame_header":
        return (side.wire.FrameError,)
    return ()


def run_side(side: Side, case: Case) -> tuple[list[Any], _Crash | None]:
    """The normalized steps of one side for ``case``, and its crash if it had one."""
    trace = Trace(_documented(side, case.target))
    crash = None
    try:
        RUNNERS[case.target](side, case, trace)
    except _Crash as exc:
        crash = exc
    # a documented error is (class name, message) already
    return [(label, how, norm(value) if how == "ok" else value)
            for label, how, value in trace.steps], crash


class Harness:
    """Compares two sides on one input at a time."""

    def __init__(self, first: Side, second: Side) -> None:
        self.first = first
        self.second = second
        self.runs = 0

    def check(self, case: Case) -> None:
        """Raise a Finding when the sides crash or differ on ``case``."""
        self.runs += 1
        steps = {}
        for side in (self.first, self.second):
            got, crash = run_side(side, case)
            if crash is not None:
                raise Finding("crash", case, f"{side.name} {crash.signature}", crash.text)
            steps[side.name] = got
        a, b = steps[self.first.name], steps[self.second.name]
        if a == b:
            return
        i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                 min(len(a), len(b)))
        x = a[i] if i < len(a) else ("(no more steps)", "", None)
        y = b[i] if i < len(b) else ("(no more steps)", "", None)
        if x[:2] == y[:2]:
            path, here_x, here_y = where(x[2], y[2])
            signature = f"{x[0]} {x[1]}: {_INDEX.sub('[]', path) or 'value'}"
        else:
            path, here_x, here_y = "", x, y
            signature = f"{x[0]} {x[1]} vs {y[0]} {y[1]}"
        raise Finding("difference", case, signature,
                      f"step {i} ({x[0]}){path}:\n  {self.first.name}: {_short(here_x)}\n"
                      f"  {self.second.name}: {_short(here_y)}\n"
                      f"the whole step, {self.first.name}: {_short(x)}")

    def one_input(self, data: bytes) -> None:
        self.check(decode_input(data))


# -- the fuzzer ---------------------------------------------------------------------------


def seed_cases() -> list[Case]:
    """The seed corpus (`tests.fuzz_wire_seeds`) as cases."""
    return [Case(*seed) for seed in seeds()]


def write_seeds(directory: Path) -> int:
    """Write the seed corpus into ``directory``; how many seeds."""
    directory.mkdir(parents=True, exist_ok=True)
    cases = seed_cases()
    for case in cases:
        data = encode_input(case)
        (directory / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
    return len(cases)


class _Recorder:
    """Keep-going mode: a finding is saved (one input per signature) and counted, and the
    run goes on."""

    def __init__(self, harness: Harness, directory: Path) -> None:
        self.harness = harness
        self.directory = directory
        self.seen: dict[str, int] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def one_input(self, data: bytes) -> None:
        try:
            self.harness.one_input(data)
        except Finding as finding:
            count = self.seen.get(finding.signature, 0)
            self.seen[finding.signature] = count + 1
            if count == 0:
                name = f"finding-{finding.kind}-{hashlib.sha1(data).hexdigest()[:16]}"
                (self.directory / name).write_bytes(data)
                (self.directory / f"{name}.txt").write_text(f"{finding}\n")
                print(f"FINDING {name}: {finding.signature}", file=sys.stderr, flush=True)


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz_wire", allow_abbrev=False,
        description="Differential fuzzer of tlog.protocol's wire parser (imported vs pure .py);"
                    " other arguments go to libFuzzer: flags (-runs=N, -max_total_time=S),"
                    " corpus directories or inputs to run once.")
    parser.add_argument("--findings", type=Path,
                        help="keep going after a finding: save one input per kind of finding"
                             " here (default: stop at the first, as libFuzzer does)")
    parser.add_argument("--alter", nargs=3, action="append", default=[],
                        metavar=("FILE", "OLD", "NEW"),
                        help="edit the pure copy's FILE (e.g. wire.py) before loading it, to"
                             " check that a difference is found")
    ours, rest = parser.parse_known_args(argv[1:])
    for path in rest:
        if not path.startswith("-") and Path(path).is_dir() and not any(Path(path).iterdir()):
            print(f"fuzz_wire: {write_seeds(Path(path))} seeds written to {path}", flush=True)
    pure = pure_side([tuple(a) for a in ours.alter], instrument=True)  # type: ignore[misc]
    print(banner(pure), flush=True)
    for name, how in compared(pure).items():
        print(f"fuzz_wire:   {name}: {how}", flush=True)
    harness = Harness(imported_side(), pure)
    test = _Recorder(harness, ours.findings).one_input if ours.findings else harness.one_input
    atheris.Setup([argv[0], *rest], test)
    atheris.Fuzz()


def iter_findings(directory: Path) -> Iterator[tuple[str, str]]:
    """(name, description) of the findings saved in keep-going mode."""
    for text in sorted(directory.glob("*.txt")):
        yield text.stem, text.read_text()


if __name__ == "__main__":
    main(sys.argv)
