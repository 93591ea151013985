#!/usr/bin/env python3
"""`make fresh-check`: the README's two commands, `make run` and `make test`, on a fresh Debian.

Run it whenever an install step (scripts/*.sh, install_capnp.sh), the Makefile or a dependency
(pyproject.toml) changed: a developer's machine has long had everything installed, a new one
has nothing, and only this shows what a fresh clone meets there. It is not part of .ci/run (it
takes about 10 minutes) and needs root.

What it does:
- a Debian bookworm made by ``debootstrap --variant=minbase`` from the host's apt mirror, with
  only python3, python3-venv, make, git and ca-certificates added, is built once and kept
  outside the clone (/var/cache/tlog-fresh-check/bookworm-pristine; ``--rebuild`` or
  TLOG_FRESH_REBUILD=1 builds it again); every run starts from a new copy of it;
- the host's apt sources, resolv.conf, local CA certificates and pip configuration (files and
  PIP_* variables) go into the copy, and the local package directories pip's configuration
  names are bind-mounted read-only, so apt and pip reach what they reach on the host; a
  policy-rc.d keeps package scripts from starting services (there is no init in a chroot);
- the commit at HEAD is cloned (``git clone``: uncommitted changes are not checked), once for
  each command, and in a chroot (/proc, /sys, /dev bind-mounted) ``make run`` must log
  "listening on" (or accept on its port) within 300 s and exit 0 on SIGTERM, and ``make test``
  must pass;
- at the end every process whose root is the copy is killed and everything is unmounted, also
  on a failure or Ctrl-C. Each step's time is printed, a failure with its command, exit
  status and last lines; the whole output of every command goes to a log file. The copy stays
  until the next run, for a look inside.
"""

from __future__ import annotations

import argparse
import configparser
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
PACKAGES = ["python3", "python3-venv", "make", "git", "ca-certificates"]
DEFAULT_MIRROR = "http://deb.debian.org/debian"
RUN_ADDRESS = ("127.0.0.1", 11211)
#: pip options whose values may name local files or directories (index, find-links, ...).
PIP_PATH_KEYS = {"index-url", "extra-index-url", "find-links", "constraint", "requirement",
                 "cert", "client-cert"}
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TAIL_LINES = 40
#: Suffix of the tree debootstrap fills; renamed to the pristine one when complete.
BUILDING = ".building"


class Interrupted(Exception):
    """A signal (Ctrl-C, SIGTERM, SIGHUP) ended the run; cleanup still runs."""


class StepFailed(Exception):
    """A step failed; the message says how, the tail is the last lines of its output."""

    def __init__(self, message: str, tail: list[str] | None = None) -> None:
        super().__init__(message)
        self.tail = tail or []


class Log:
    """Progress lines to the console and the log file; command output to the file only."""

    def __init__(self, path: Path, verbose: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = path.open("a", encoding="utf-8", errors="replace")
        self.verbose = verbose
        self.start = time.monotonic()
        self.lock = threading.Lock()

    def say(self, message: str) -> None:
        """A progress line, stamped with the minutes and seconds since the start."""
        elapsed = int(time.monotonic() - self.start)
        line = f"[{elapsed // 60:3d}:{elapsed % 60:02d}] {message}"
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()

    def output(self, line: str) -> None:
        """One line of a command's output."""
        with self.lock:
            self.file.write(line + "\n")
            self.file.flush()
            if self.verbose:
                print("    " + line, flush=True)


class Reader:
    """Reads a process's output in a thread: to the log, the last lines kept, a pattern watched."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Log, pattern: str | None = None):
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.seen = threading.Event()
        self.done = threading.Event()
        self._proc, self._log, self._pattern = proc, log, pattern
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.tail.append(line)
            self._log.output(line)
            if self._pattern and self._pattern in line:
                self.seen.set()
        self.done.set()


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below root, deepest first (from /proc/self/mountinfo)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(root) or point.startswith(str(root) + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def chroot_pids(root: Path) -> list[int]:
    """Processes whose root directory is root or below it."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            link = os.readlink(f"/proc/{entry.name}/root")
        except OSError:
            continue
        if link == str(root) or link.startswith(str(root) + "/"):
            pids.append(int(entry.name))
    return pids


def describe(pid: int) -> str:
    """pid and command line of a process, for a report."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    return f"{pid} " + " ".join(a.decode("utf-8", "replace") for a in argv if a)[:120]


def kill_chroot(root: Path) -> list[str]:
    """Ends every process inside root: SIGTERM, up to 5 s, then SIGKILL. Returns what it found."""
    pids = chroot_pids(root)
    found = [describe(pid) for pid in pids]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not zombie(pid)]
        if not pids:
            break
    return found


def zombie(pid: int) -> bool:
    """True when the process has exited and only waits to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def unmount_all(root: Path, log: Log) -> list[str]:
    """Unmounts everything below root; returns the mount points it could not unmount."""
    for attempt in range(3):
        points = mounts_under(root)
        if not points:
            return []
        for point in points:
            result = subprocess.run(["umount", point], capture_output=True, text=True)
            if result.returncode != 0:
                log.output(f"umount {point}: {result.stderr.strip()} (attempt {attempt + 1})")
        if mounts_under(root):
            kill_chroot(root)
            time.sleep(0.5)
    for point in mounts_under(root):
        subprocess.run(["umount", "--lazy", point], capture_output=True)
        log.say(f"had to detach {point} lazily: something still used it")
    return mounts_under(root)


def remove_tree(path: Path, log: Log) -> None:
    """Removes a tree left by an earlier run, after ending its processes and mounts."""
    if not path.exists():
        return
    kill_chroot(path)
    if unmount_all(path, log):
        raise StepFailed(f"{path} still has mounts below it; not removing it")
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def run_logged(cmd: list[str], log: Log, what: str, timeout: float = 1800) -> None:
    """Runs a host command with its output in the log; StepFailed on a non-zero exit."""
    log.output(f"$ {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    reader = Reader(proc, log)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"{what}: no end after {timeout:.0f} s", list(reader.tail)) from None
    finally:
        if proc.poll() is None:  # timed out or interrupted: it and what it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.done.wait(10)
    if rc != 0:
        raise StepFailed(f"{what}: exit status {rc}", list(reader.tail))


def apt_mirror() -> str:
    """The host's Debian mirror: the URI of the bookworm entry of its apt sources."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for stanza in re.split(r"\n\s*\n", sources.read_text()):
            fields: dict[str, str] = dict(re.findall(r"^([\w-]+):\s*(.*)$", stanza, re.M))
            if SUITE in fields.get("Suites", "").split() and "deb" in fields.get("Types", ""):
                return fields["URIs"].split()[0]
    for listing in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]:
        if listing.exists():
            match = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", listing.read_text(),
                              re.M)
            if match:
                return match.group(1)
    return DEFAULT_MIRROR


def build_pristine(pristine: Path, mirror: str, log: Log) -> None:
    """debootstrap into a new directory, renamed to pristine only once it is complete."""
    if shutil.which("debootstrap") is None:
        log.say("installing debootstrap (apt-get)")
        run_logged(["apt-get", "update", "-qq"], log, "apt-get update")
        run_logged(["apt-get", "install", "-y", "-qq", "debootstrap"], log,
                   "apt-get install debootstrap")
    building = pristine.with_name(pristine.name + BUILDING)
    remove_tree(building, log)
    log.say(f"debootstrap --variant=minbase {SUITE} from {mirror}, with {', '.join(PACKAGES)}")
    try:
        run_logged(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                    SUITE, str(building), mirror], log, "debootstrap")
    except StepFailed as failed:
        own_log = building / "debootstrap" / "debootstrap.log"
        if own_log.exists():
            failed.tail += ["--- " + str(own_log)] + own_log.read_text().splitlines()[-15:]
        raise
    finally:
        unmount_all(building, log)  # debootstrap mounts /proc and /sys itself
    remove_tree(pristine, log)
    building.rename(pristine)


def copy_into(src: Path, root: Path, dest: str | None = None) -> None:
    """Copies a host file or directory to the same path (or dest) inside root."""
    target = root / (dest or str(src)).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, target, dirs_exist_ok=True)
    else:
        shutil.copy2(src, target)


def setup_apt(root: Path) -> None:
    """The host's apt sources (and the keyrings they name) and resolver; services kept down."""
    (root / "etc/apt/sources.list").unlink(missing_ok=True)  # debootstrap's: host's replace it
    for src in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if src.is_file() and src.suffix in (".list", ".sources"):
            copy_into(src, root)
            named = re.findall(r"(?:Signed-By:|signed-by=)\s*(/\S+?)[\]\s]", src.read_text())
            for keyring in named:
                if Path(keyring).is_file() and not (root / keyring.lstrip("/")).exists():
                    copy_into(Path(keyring), root)
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_bytes(Path("/etc/resolv.conf").read_bytes())
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# fresh-check: no services started inside the chroot\nexit 101\n")
    policy.chmod(0o755)


def setup_pip(root: Path) -> tuple[dict[str, str], list[Path]]:
    """Copies the host's pip configuration in; returns its PIP_* variables and the local
    directories it names (to bind-mount read-only)."""
    home = Path.home()
    user_files = {home / ".config/pip/pip.conf": "/root/.config/pip/pip.conf",
                  home / ".pip/pip.conf": "/root/.pip/pip.conf"}
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    files: list[Path] = [Path("/etc/pip.conf")]
    for base in os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":"):
        files.append(Path(base) / "pip" / "pip.conf")
        if (Path(base) / "pip").is_dir():
            copy_into(Path(base) / "pip", root)  # with what its pip.conf names (constraints)
    files += list(user_files)
    if "PIP_CONFIG_FILE" in env and env["PIP_CONFIG_FILE"] != os.devnull:
        files.append(Path(env["PIP_CONFIG_FILE"]))
    values = [v for k, v in env.items() if k[4:].lower().replace("_", "-") in PIP_PATH_KEYS]
    for path in files:
        if not path.is_file():
            continue
        copy_into(path, root, user_files.get(path))
        parser = configparser.RawConfigParser()
        parser.read(path)
        for section in parser.sections():
            values += [v for k, v in parser.items(section) if k in PIP_PATH_KEYS]
    mounts: list[Path] = []
    for token in " ".join(values).split():
        local = Path(token[len("file://"):] if token.startswith("file://") else token)
        if not local.is_absolute() or not local.exists():
            continue
        if local.is_dir():
            # an index's pages link to files next to it (../../files/x.whl)
            mounts.append(local.parent if local.name == "simple" else local)
        elif not (root / str(local).lstrip("/")).exists():
            copy_into(local, root)
    mounts = sorted(set(mounts))
    outer = [m for m in mounts if not any(o != m and o in m.parents for o in mounts)]
    return env, outer


def chroot_cmd(root: Path, env: dict[str, str], script: str) -> list[str]:
    """A shell command line run inside root with a clean environment plus env."""
    base = {"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
    assigns = [f"{k}={v}" for k, v in {**base, **env}.items()]
    return ["chroot", str(root), "/usr/bin/env", "-i", *assigns, "/bin/sh", "-c", script]


def port_free(address: tuple[str, int]) -> bool:
    """True when the address can be bound here (the chroot shares the host's network)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return False
    return True


def accepts(address: tuple[str, int]) -> bool:
    """True when something accepts TCP connections on the address."""
    try:
        with socket.create_connection(address, timeout=1):
            return True
    except OSError:
        return False


def check_run(root: Path, env: dict[str, str], log: Log, wait: float) -> str:
    """`make run` in a fresh clone: up within wait seconds, then exit 0 on SIGTERM."""
    address = RUN_ADDRESS
    if not port_free(address):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            address = ("127.0.0.1", sock.getsockname()[1])
        log.say(f"127.0.0.1:{RUN_ADDRESS[1]} is taken on this host: make run gets "
                f"ADDRESS=127.0.0.1:{address[1]}")
        env = {**env, "ADDRESS": f"127.0.0.1:{address[1]}"}
    cmd = chroot_cmd(root, env, "cd /root/tlog-run && exec make run")
    log.output("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    reader = Reader(proc, log, pattern="listening on")
    start = time.monotonic()
    try:
        deadline = start + wait
        while not (reader.seen.wait(1) or accepts(address)):
            if proc.poll() is not None:
                reader.done.wait(10)
                raise StepFailed(f"make run: exited with status {proc.returncode} before "
                                 "listening", list(reader.tail))
            if time.monotonic() > deadline:
                raise StepFailed(f"make run: not listening after {wait:.0f} s", list(reader.tail))
        up = time.monotonic() - start
        servers = [pid for pid in chroot_pids(root) if "tlogserver" in describe(pid)
                   and "--address" in describe(pid)]
        if not servers:
            raise StepFailed("make run: listening, but no tlogserver process found",
                             list(reader.tail))
        for pid in servers:
            os.kill(pid, signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            raise StepFailed("make run: still running 60 s after SIGTERM to tlogserver",
                             list(reader.tail)) from None
        reader.done.wait(10)
        if rc != 0:
            raise StepFailed(f"make run: exit status {rc} after SIGTERM to tlogserver",
                             list(reader.tail))
        return f"listening after {up:.0f} s, exit status 0 on SIGTERM"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def check_test(root: Path, env: dict[str, str], log: Log, timeout: float) -> str:
    """`make test` in a fresh clone: it must pass within timeout seconds."""
    cmd = chroot_cmd(root, env, "cd /root/tlog-test && exec make test")
    log.output("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    reader = Reader(proc, log)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"make test: no end after {timeout:.0f} s", list(reader.tail)) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.done.wait(10)
    summary = next((line for line in reversed(reader.tail) if re.search(r"\d+ passed", line)), "")
    if rc != 0:
        raise StepFailed(f"make test: exit status {rc}", list(reader.tail))
    return summary.strip("= ") or "exit status 0"


def git(*args: str) -> str:
    """Output of a git command in the project's repository."""
    return subprocess.run(["git", "-C", str(SRC), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


class Check:
    """One run: steps timed and reported, cleanup guaranteed."""

    def __init__(self, args: argparse.Namespace, log: Log) -> None:
        self.args, self.log = args, log
        self.cache = Path(args.cache).resolve()
        self.pristine = self.cache / f"{SUITE}-pristine"
        self.root = self.cache / "run"
        self.results: list[tuple[str, float, str]] = []
        self.env: dict[str, str] = {}
        self.head = ""

    def step(self, name: str, work: Callable[[], str | None], *, fatal: bool = True) -> bool:
        """Runs work(), times it, reports it; a failure stops the run when fatal."""
        self.log.say(f"{name} ...")
        start = time.monotonic()
        try:
            note = work() or "ok"
        except (KeyboardInterrupt, Interrupted):
            self.results.append((name, time.monotonic() - start, "interrupted"))
            raise
        except StepFailed as failed:
            took = time.monotonic() - start
            self.results.append((name, took, f"FAILED: {failed}"))
            self.log.say(f"{name}: FAILED after {took:.1f} s: {failed}")
            if failed.tail:
                self.log.say(f"last {len(failed.tail)} lines of its output:")
                for line in failed.tail:
                    self.log.say("  | " + line)
            if fatal:
                raise
            return False
        took = time.monotonic() - start
        self.results.append((name, took, note))
        self.log.say(f"{name}: {note} ({took:.1f} s)")
        return True

    def mount(self, src: Path, read_only: bool = False) -> None:
        """Bind-mounts a host path at the same path inside the copy."""
        target = self.root / str(src).lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", *(["-o", "ro"] if read_only else []), str(src),
                        str(target)], check=True)

    def prepare(self) -> str:
        """Host configuration into the copy, mounts, CA certificates, the two clones."""
        setup_apt(self.root)
        self.env, pip_dirs = setup_pip(self.root)
        local_cas = Path("/usr/local/share/ca-certificates")
        if local_cas.is_dir() and any(local_cas.iterdir()):
            copy_into(local_cas, self.root)
        for system in ("/proc", "/sys", "/dev", "/dev/pts", "/dev/shm"):
            if system in ("/proc", "/sys", "/dev") or os.path.ismount(system):
                self.mount(Path(system))
        for local in pip_dirs:
            self.mount(local, read_only=True)
        run_logged(chroot_cmd(self.root, {}, "update-ca-certificates"), self.log,
                   "update-ca-certificates")
        for name in ("tlog-run", "tlog-test"):
            dest = self.root / "root" / name
            run_logged(["git", "clone", "--quiet", "--no-checkout", str(SRC), str(dest)],
                       self.log, "git clone")
            run_logged(["git", "-C", str(dest), "checkout", "--quiet", "--detach", self.head],
                       self.log, "git checkout")
        shown = ", ".join(str(p) for p in pip_dirs) or "none"
        return f"pip's local package directories mounted read-only: {shown}"

    def run(self) -> bool:
        """All steps; False when one failed."""
        self.head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        self.log.say(f"checking commit {git('log', '-1', '--format=%h %s')[:90]}")
        self.log.say(f"  of {SRC}, from a git clone: uncommitted changes are NOT included"
                     + (f" (files with some: {len(dirty.splitlines())})" if dirty else ""))
        self.log.say(f"full log: {self.log.path}")
        if self.args.rebuild or not self.pristine.is_dir():
            self.step("debootstrap", lambda: build_pristine(self.pristine, apt_mirror(),
                                                            self.log))
        else:
            built = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.pristine.stat().st_mtime))
            self.log.say(f"pristine {SUITE}: {self.pristine} (built {built}; --rebuild or "
                         "TLOG_FRESH_REBUILD=1 to build it again)")
        self.step("copy", self.copy)
        self.step("prepare", self.prepare)
        ok = self.step("make run", lambda: check_run(self.root, self.env, self.log,
                                                     self.args.run_wait), fatal=False)
        ok = self.step("make test", lambda: check_test(self.root, self.env, self.log,
                                                       self.args.test_timeout),
                       fatal=False) and ok
        return ok

    def copy(self) -> str:
        """A new copy of the pristine tree (the last run's copy removed first)."""
        start = time.monotonic()
        remove_tree(self.root, self.log)
        removed = time.monotonic() - start
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.pristine), str(self.root)],
                       check=True)
        copied = time.monotonic() - start - removed
        return f"{self.root} (last run's copy removed in {removed:.1f} s, copied in {copied:.1f} s)"

    def cleanup(self) -> bool:
        """Ends what runs inside and unmounts everything; False when either was needed late or
        failed."""
        start = time.monotonic()
        building = self.pristine.with_name(self.pristine.name + BUILDING)
        left, stuck = [], []
        for tree in (self.root, building):  # an interrupted debootstrap leaves its mounts
            left += kill_chroot(tree)
            stuck += unmount_all(tree, self.log)
        took = time.monotonic() - start
        if left:
            self.log.say(f"still running inside the chroot at the end, killed: {'; '.join(left)}")
        if stuck:
            self.log.say(f"STILL MOUNTED: {', '.join(stuck)}")
        note = "nothing left running or mounted" if not (left or stuck) else "see above"
        self.results.append(("cleanup", took, note))
        return not stuck

    def summary(self) -> None:
        """The table of steps, times and results."""
        self.log.say("summary:")
        for name, took, note in self.results:
            self.log.say(f"  {name:<12} {took:7.1f} s  {note}")
        self.log.say(f"full log: {self.log.path}")
        if self.root.is_dir():
            self.log.say(f"the chroot stays at {self.root} until the next run")


def interrupt(signum: int, _frame: object) -> None:
    """Turns SIGTERM and SIGHUP into an exception, so that cleanup runs."""
    raise Interrupted(signal.Signals(signum).name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true",
                        default=os.environ.get("TLOG_FRESH_REBUILD") == "1",
                        help="build the pristine Debian again (also TLOG_FRESH_REBUILD=1)")
    parser.add_argument("--cache", default=os.environ.get("TLOG_FRESH_CACHE",
                                                          "/var/cache/tlog-fresh-check"),
                        help="where the pristine tree, the run's copy and the logs are kept")
    parser.add_argument("--run-wait", type=float, default=300,
                        help="seconds make run may take to listen (default 300)")
    parser.add_argument("--test-timeout", type=float, default=3600,
                        help="seconds make test may take (default 3600)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every command's output, not only the log file's")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("fresh-check: needs root (debootstrap, chroot, mount)", file=sys.stderr)
        return 2
    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    lock = (cache / "lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"fresh-check: another run holds {cache / 'lock'}", file=sys.stderr)
        return 2
    log = Log(cache / "logs" / time.strftime("fresh-check-%Y%m%d-%H%M%S.log"), args.verbose)
    check = Check(args, log)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    ok = False
    try:
        ok = check.run()
    except StepFailed:
        pass  # reported by step()
    except (KeyboardInterrupt, Interrupted) as stop:
        log.say(f"interrupted ({str(stop) or 'SIGINT'}); cleaning up")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not stop the unmounting
        clean = check.cleanup()
        check.summary()
    log.say("fresh-check: " + ("passed" if ok and clean else "FAILED"))
    return 0 if ok and clean else 1


if __name__ == "__main__":
    sys.exit(main())
