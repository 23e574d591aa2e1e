"""A local single-node Apache Kafka broker (KRaft), fetched with Maven and run with `java`.

The recipe lives in `deploy/kafka/` (shipped in the wheel as `pipeline/_kafka_recipe`):
`pom.xml` pins the Kafka version and its runtime jars, `server.properties.template` holds
the single-node KRaft settings, `log4j2.yaml` sends the broker's logs to a file.

Where things go:

* jars: Maven's own repository (`~/.m2`); the resolved classpath is cached, keyed on a hash
  of the POM, in `$QUOTAFLOW_KAFKA_JARS` (default `~/.cache/quotaflow/kafka`) as
  `classpath-<hash>.txt` (plus `mvn-<hash>.log`), shared by every home;
* broker data and state: `<home>/kafka/` with `data/` (partitions and the KRaft metadata
  log), `logs/` (`server.log`, the JVM's `kafka.out`, `format.log`), `server.properties`
  and `state.json` (pid and bootstrap address of the running broker). `home` is
  `$QUOTAFLOW_HOME` or `./.quotaflow`.

Every failure is a `KafkaLocalError` whose first line says what went wrong and what to do;
Java stack traces stay in the log files.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import time
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from topics.errors import KafkaLocalError

__all__ = [
    "JVM_OPTS",
    "KAFKA_VERSION",
    "BrokerStatus",
    "LocalKafka",
    "free_port",
]

KAFKA_VERSION = "4.1.2"
"""The Kafka version run locally; equal to `kafka.version` in deploy/kafka/pom.xml (tested)."""

JVM_OPTS: tuple[str, ...] = (
    # A small heap: a dev broker with a handful of topics needs far less than Kafka's 1 GB.
    "-Xms256m",
    "-Xmx768m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-Dfile.encoding=UTF-8",
)
"""JVM options of the broker; `$QUOTAFLOW_KAFKA_JVM_OPTS` is appended (so it can override)."""

HOST = "127.0.0.1"
MIN_JAVA = 17
_NODE_ID = 1
_MVN_TIMEOUT_S = 1800.0
_FORMAT_TIMEOUT_S = 120.0
_PROBE_TIMEOUT_S = 5.0
_POLL_S = 0.25
# free_port: where the kernel's ephemeral range is read (and what Linux defaults it to),
# the lowest port chosen (above Ray's worker ports, 10002-19999 by default; the highest is
# just below the ephemeral range, or 65535 above it), and how many random ones are tried
# before falling back to bind(0).
_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_EPHEMERAL_DEFAULT = (32768, 60999)
_STABLE_PORTS_FROM = 20000
_FREE_PORT_TRIES = 200
_HANDED_OUT: set[int] = set()
_JAVA_HINT = "install a JDK 17+ (e.g. `apt-get install openjdk-17-jre-headless`)"
_MVN_HINT = "install Apache Maven 3.6+ (e.g. `apt-get install maven`) to fetch the Kafka jars"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STACK_LINE = re.compile(r"^(\s|at\s|\.\.\.\s*\d+\s+more)")
_MVN_BOILERPLATE = re.compile(
    r"^\$ |^\[ERROR\]\s*$|full stack trace|Re-run Maven|For more information|\[Help \d+\] http"
)

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


def _recipe_dir() -> Path:
    """`pipeline/_kafka_recipe` in an installed wheel, else the repository's `deploy/kafka`."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_kafka_recipe", here.parent / "deploy" / "kafka"):
        if (candidate / "pom.xml").is_file():
            return candidate
    raise KafkaLocalError(f"the Kafka recipe (deploy/kafka/pom.xml) is missing next to {here}")


def _default_home() -> Path:
    env = os.environ.get("QUOTAFLOW_HOME")
    return Path(env) if env else Path.cwd() / ".quotaflow"


def _default_jars_dir() -> Path:
    env = os.environ.get("QUOTAFLOW_KAFKA_JARS")
    return Path(env) if env else Path.home() / ".cache" / "quotaflow" / "kafka"


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes outgoing connections' local ports from."""
    try:
        with open(_EPHEMERAL_RANGE_FILE, encoding="ascii") as f:
            low, high = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT
    return low, high


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, outside the ephemeral range.

    A port the OS picks (`bind(0)`) is an ephemeral one: while its server restarts, any
    outgoing connection (Ray opens many) may take it as its local port, and the server
    cannot listen again. Ports between Ray's worker range and the ephemeral range are
    never handed out that way.
    """
    low, high = _ephemeral_ports()
    lo, hi = (_STABLE_PORTS_FROM, low - 1) if low > _STABLE_PORTS_FROM else (high + 1, 65535)
    candidates = list(range(lo, hi + 1))
    random.shuffle(candidates)
    for port in candidates[:_FREE_PORT_TRIES]:
        # Not one handed out before in this process: its server may not listen yet.
        if port not in _HANDED_OUT and not _port_in_use(port):
            _HANDED_OUT.add(port)
            return port
    # Everything tried is taken: an ephemeral port still works until a restart.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _port_in_use(port: int) -> bool:
    """Whether a server socket could not bind 127.0.0.1:port (as Kafka binds: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class BrokerStatus:
    """What `LocalKafka.status()` sees: `running` means the broker process is alive."""

    running: bool
    pid: int | None
    bootstrap: str | None
    data_dir: Path
    log_path: Path


@dataclass(frozen=True)
class _State:
    pid: int
    bootstrap: str
    port: int
    controller_port: int


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) held for the `with` block; other processes wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _run_coroutine(coro: Coroutine[Any, Any, _T]) -> _T:
    """`asyncio.run(coro)`, in a worker thread when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def _quiet_aiokafka() -> Iterator[None]:
    """Silence aiokafka's connection errors while probing a broker that is still starting."""
    loggers = [logging.getLogger(name) for name in ("aiokafka.client", "aiokafka.conn")]
    drop = _DropRecords()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


async def _fetch_metadata(bootstrap: str, timeout_s: float) -> bool:
    """Whether the broker at `bootstrap` answers a Metadata request listing >= 1 broker."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError

    client = AIOKafkaClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=max(1, int(timeout_s * 1000)),
        retry_backoff_ms=100,
    )
    try:
        await asyncio.wait_for(client.bootstrap(), timeout_s)
        cluster = await asyncio.wait_for(client.fetch_all_metadata(), timeout_s)
        return bool(cluster.brokers())
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        with contextlib.suppress(KafkaError, OSError, TimeoutError):
            await client.close()


def _answers(port: int, timeout_s: float = _PROBE_TIMEOUT_S) -> bool:
    """A cheap TCP check first, then a real Kafka Metadata request."""
    if timeout_s <= 0 or not _accepts_tcp(port):
        return False
    with _quiet_aiokafka():
        return _run_coroutine(_fetch_metadata(f"{HOST}:{port}", timeout_s))


def _tail(path: Path, max_lines: int = 200, *, start: int = 0) -> list[str]:
    """The last `max_lines` lines of a text file (from byte `start`), ANSI colours removed."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            begin = max(start if start <= size else 0, size - 256 * 1024)
            handle.seek(begin)
            data = handle.read()
    except OSError:
        return []
    lines = _ANSI.sub("", data.decode("utf-8", "replace")).splitlines()
    return lines[-max_lines:]


def _meaningful(lines: list[str], count: int = 5) -> list[str]:
    """The last `count` non-blank lines that are not Java stack frames, shortened."""
    kept = [line.rstrip() for line in lines if line.strip() and not _STACK_LINE.match(line)]
    return [line if len(line) <= 400 else line[:397] + "..." for line in kept[-count:]]


def _with_lines(headline: str, lines: list[str]) -> str:
    return headline if not lines else headline + "\n" + "\n".join(f"    {ln}" for ln in lines)


def _require(tool: str, hint: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise KafkaLocalError(f"{tool} not found on PATH: {hint}")
    return found


def _java_major(java: str) -> int | None:
    """The major version `java -version` reports (8 for "1.8.0_x"), None if unreadable."""
    try:
        done = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', done.stderr + done.stdout)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def _cluster_id() -> str:
    """A random Kafka cluster id (a UUID in URL-safe base64 without padding, like Kafka's)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")


class LocalKafka:
    """Fetches, formats, starts and stops one local broker whose files live under `home`."""

    def __init__(self, home: Path | None = None, *, jars_dir: Path | None = None) -> None:
        self.home = (home if home is not None else _default_home()).resolve()
        self.jars_dir = (jars_dir if jars_dir is not None else _default_jars_dir()).resolve()
        self.recipe_dir = _recipe_dir()
        self.root = self.home / "kafka"
        self.data_dir = self.root / "data"
        self.logs_dir = self.root / "logs"
        self.log_path = self.logs_dir / "server.log"
        self.out_path = self.logs_dir / "kafka.out"
        self.props_path = self.root / "server.properties"
        self.state_path = self.root / "state.json"
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ jars

    def _pom_hash(self) -> str:
        return hashlib.sha256((self.recipe_dir / "pom.xml").read_bytes()).hexdigest()[:16]

    def classpath_file(self) -> Path:
        """The classpath cache file for the current POM (may not exist yet)."""
        return self.jars_dir / f"classpath-{self._pom_hash()}.txt"

    @staticmethod
    def _read_classpath(path: Path) -> list[Path] | None:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError:
            return None
        jars = [Path(p) for p in text.split(os.pathsep) if p]
        if not jars or not all(jar.is_file() for jar in jars):
            return None  # e.g. ~/.m2 was cleaned since: resolve again
        return jars

    def fetch(self) -> list[Path]:
        """Resolve the broker's jars with Maven (only when not cached for this POM)."""
        cp_file = self.classpath_file()
        jars = self._read_classpath(cp_file)
        if jars is not None:
            return jars
        mvn = _require("mvn", _MVN_HINT)
        with _file_lock(self.jars_dir / ".lock"):
            jars = self._read_classpath(cp_file)  # another process may have just done it
            if jars is not None:
                return jars
            pom = self.recipe_dir / "pom.xml"
            mvn_log = self.jars_dir / f"mvn-{self._pom_hash()}.log"
            tmp = cp_file.with_suffix(f".tmp{os.getpid()}")
            cmd = [
                mvn,
                "-B",
                "-q",
                "-U",  # retry artifacts whose download failed before (no-op for cached ones)
                "-f",
                str(pom),
                "dependency:build-classpath",
                "-Dmdep.includeScope=runtime",
                f"-Dmdep.outputFile={tmp}",
            ]
            _log.info("resolving Kafka %s jars with Maven (first run only)", KAFKA_VERSION)
            started = time.monotonic()
            try:
                with mvn_log.open("wb") as out:
                    out.write(f"$ {shlex.join(cmd)}\n".encode())
                    out.flush()
                    done = subprocess.run(
                        cmd,
                        cwd=self.jars_dir,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        timeout=_MVN_TIMEOUT_S,
                        check=False,
                    )
            except subprocess.TimeoutExpired:
                raise KafkaLocalError(
                    f"mvn did not finish resolving the Kafka jars in {_MVN_TIMEOUT_S:.0f} s; "
                    f"see {mvn_log}"
                ) from None
            if done.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise KafkaLocalError(
                    _with_lines(
                        f"mvn failed (exit code {done.returncode}) resolving the Kafka jars "
                        f"from {pom}; see {mvn_log}",
                        _meaningful(
                            [ln for ln in _tail(mvn_log) if not _MVN_BOILERPLATE.search(ln)]
                        ),
                    )
                )
            jars = self._read_classpath(tmp)
            if jars is None:
                tmp.unlink(missing_ok=True)
                raise KafkaLocalError(
                    f"mvn wrote no usable classpath for the Kafka jars; see {mvn_log}"
                )
            os.replace(tmp, cp_file)
            _log.info("Kafka jars resolved in %.1f s", time.monotonic() - started)
            return jars

    # ------------------------------------------------------------------ state

    def _read_state(self) -> _State | None:
        try:
            raw = json.loads(self.state_path.read_text(encoding="utf-8"))
            return _State(
                pid=int(raw["pid"]),
                bootstrap=str(raw["bootstrap"]),
                port=int(raw["port"]),
                controller_port=int(raw["controller_port"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_state(self, state: _State) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        payload = {
            "pid": state.pid,
            "bootstrap": state.bootstrap,
            "port": state.port,
            "controller_port": state.controller_port,
            "kafka_version": KAFKA_VERSION,
            "started_at": time.time(),
        }
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.state_path)

    def _cmdline(self, pid: int) -> str | None:
        """The command line of `pid` (None when unreadable, e.g. no /proc)."""
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            try:
                done = subprocess.run(
                    ["ps", "-o", "command=", "-p", str(pid)],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError):
                return None
            return done.stdout.strip() or None
        return raw.replace(b"\0", b" ").decode("utf-8", "replace")

    def _alive(self, pid: int) -> bool:
        """Whether `pid` runs (a zombie does not count; our own child gets reaped)."""
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        return stat.rpartition(")")[2].split()[:1] != ["Z"]

    def _is_ours(self, pid: int) -> bool:
        """Whether `pid` is alive and is the broker of this home (guards against pid reuse)."""
        if not self._alive(pid):
            return False
        cmdline = self._cmdline(pid)
        return cmdline is None or ("kafka.Kafka" in cmdline and str(self.props_path) in cmdline)

    def _stray_pids(self) -> set[int]:
        """Brokers of this home found in /proc (e.g. state.json was lost)."""
        found: set[int] = set()
        proc = Path("/proc")
        if not proc.is_dir():
            return found
        needle = str(self.props_path).encode()
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"kafka.Kafka" in cmdline and needle in cmdline.split(b"\0"):
                pid = int(entry.name)
                if self._alive(pid):
                    found.add(pid)
        return found

    def _running(self) -> _State | None:
        state = self._read_state()
        return state if state is not None and self._is_ours(state.pid) else None

    def status(self) -> BrokerStatus:
        """Whether this home's broker process is alive, its pid and bootstrap address."""
        state = self._running()
        return BrokerStatus(
            running=state is not None,
            pid=state.pid if state is not None else None,
            bootstrap=state.bootstrap if state is not None else None,
            data_dir=self.data_dir,
            log_path=self.log_path,
        )

    # ------------------------------------------------------------------ up

    def _log_excerpt(self, log_offset: int) -> tuple[str, list[str]]:
        """Where to look, and the last meaningful lines of this start's logs."""
        out_lines = _meaningful(_tail(self.out_path))
        log_lines = _meaningful(_tail(self.log_path, start=log_offset))
        where = f"see {self.log_path}"
        if out_lines:
            where += f" and {self.out_path}"
        return where, (out_lines + log_lines)[-5:]

    def _write_properties(self, port: int, controller_port: int) -> None:
        template = (self.recipe_dir / "server.properties.template").read_text(encoding="utf-8")
        text = string.Template(template).substitute(
            port=port, controller_port=controller_port, data_dir=self.data_dir
        )
        self.props_path.write_text(text, encoding="utf-8")

    def _java_cmd(self, java: str, jars: list[Path], opts: Sequence[str], *main: str) -> list[str]:
        """`java <opts> <logging> -cp <jars> <main class and args>`."""
        return [
            java,
            *opts,
            f"-Dlog4j2.configurationFile={self.recipe_dir / 'log4j2.yaml'}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            # Kafka flushes its logs itself on SIGTERM; log4j2's own hook only warns then.
            "-Dlog4j2.shutdownHookEnabled=false",
            "-cp",
            os.pathsep.join(str(jar) for jar in jars),
            *main,
        ]

    def _format(self, java: str, jars: list[Path]) -> None:
        """Format the storage (once per home: `meta.properties` marks a formatted dir)."""
        if (self.data_dir / "meta.properties").is_file():
            return
        format_log = self.logs_dir / "format.log"
        cmd = self._java_cmd(
            java,
            jars,
            ["-Xmx256m"],
            "kafka.tools.StorageTool",
            "format",
            # One argument, `=` joined: an id may start with "-", which argparse would
            # otherwise take for an option ("expected one argument", 1 start in 64).
            f"--cluster-id={_cluster_id()}",
            "--config",
            str(self.props_path),
        )
        try:
            with format_log.open("wb") as out:
                done = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=_FORMAT_TIMEOUT_S,
                    check=False,
                )
        except subprocess.TimeoutExpired:
            raise KafkaLocalError(
                f"formatting the Kafka storage in {self.data_dir} timed out; see {format_log}"
            ) from None
        if done.returncode != 0:
            raise KafkaLocalError(
                _with_lines(
                    f"formatting the Kafka storage in {self.data_dir} failed "
                    f"(exit code {done.returncode}); see {format_log}",
                    _meaningful(_tail(format_log)),
                )
            )

    def up(self, port: int | None = 9092, *, timeout_s: float = 90.0) -> str:
        """Start the broker (port None/0: a free one) and return "127.0.0.1:PORT" once it
        answers a Metadata request. If this home's broker already runs, return its address
        (whatever `port` says)."""
        self.root.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        with _file_lock(self.root / ".lock"):
            existing = self._running()
            if existing is not None:
                while not _answers(existing.port, min(_PROBE_TIMEOUT_S, self._left(deadline))):
                    if not self._is_ours(existing.pid) or time.monotonic() >= deadline:
                        where, lines = self._log_excerpt(0)
                        raise KafkaLocalError(
                            _with_lines(
                                f"the Kafka broker of {self.home} (pid {existing.pid}) does "
                                f"not answer on {existing.bootstrap}; stop it with `quotaflow "
                                f"kafka down`; {where}",
                                lines,
                            )
                        )
                    time.sleep(_POLL_S)
                return existing.bootstrap
            for pid in self._stray_pids():  # a broker of ours without state: replace it
                self._stop_pids({pid}, 30.0)
            self.state_path.unlink(missing_ok=True)
            return self._start(port, deadline)

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    def _start(self, port: int | None, deadline: float) -> str:
        if port is None or port == 0:
            port = free_port()
        elif not 0 < port < 65536:
            raise KafkaLocalError(
                f"port {port} is not a valid TCP port (1-65535, or 0 for a free one)"
            )
        elif _port_in_use(port):
            raise KafkaLocalError(
                f"port {port} on {HOST} is already in use; pass --port 0 for a free port"
            )
        java = _require("java", _JAVA_HINT)
        major = _java_major(java)
        if major is not None and major < MIN_JAVA:
            raise KafkaLocalError(
                f"{java} is Java {major}, Kafka {KAFKA_VERSION} needs Java {MIN_JAVA}+: "
                f"{_JAVA_HINT} and put it first on PATH"
            )
        jars = self.fetch()
        controller_port = free_port()
        while controller_port == port:
            controller_port = free_port()
        for folder in (self.data_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._write_properties(port, controller_port)
        self._format(java, jars)

        extra = shlex.split(os.environ.get("QUOTAFLOW_KAFKA_JVM_OPTS", ""))
        cmd = self._java_cmd(java, jars, [*JVM_OPTS, *extra], "kafka.Kafka", str(self.props_path))
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.out_path.open("wb") as out:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self._proc
        bootstrap = f"{HOST}:{port}"
        self._write_state(_State(proc.pid, bootstrap, port, controller_port))
        _log.info("started Kafka %s (pid %d) on %s", KAFKA_VERSION, proc.pid, bootstrap)

        while True:
            code = proc.poll()
            if code is not None:
                self.state_path.unlink(missing_ok=True)
                where, lines = self._log_excerpt(log_offset)
                raise KafkaLocalError(
                    _with_lines(
                        f"the Kafka broker exited during startup (exit code {code}); {where}",
                        lines,
                    )
                )
            if _answers(port, min(_PROBE_TIMEOUT_S, self._left(deadline))):
                return bootstrap
            if time.monotonic() >= deadline:
                self._stop_pids({proc.pid}, 15.0)
                self.state_path.unlink(missing_ok=True)
                where, lines = self._log_excerpt(log_offset)
                raise KafkaLocalError(
                    _with_lines(
                        f"the Kafka broker did not answer on {bootstrap} in time; {where}",
                        lines,
                    )
                )
            time.sleep(_POLL_S)

    # ------------------------------------------------------------------ down

    def _signal(self, pid: int, sig: signal.Signals) -> None:
        """Signal the broker's process group (it leads its own session), else the pid."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    def _wait_gone(self, pids: set[int], timeout_s: float) -> set[int]:
        """Wait until `pids` have exited; return those still alive at the timeout."""
        deadline = time.monotonic() + timeout_s
        alive = {pid for pid in pids if self._alive(pid)}
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = {pid for pid in alive if self._alive(pid)}
        return alive

    def _stop_pids(self, pids: set[int], timeout_s: float) -> None:
        for pid in pids:
            self._signal(pid, signal.SIGTERM)
        alive = self._wait_gone(pids, timeout_s)
        for pid in alive:
            self._signal(pid, signal.SIGKILL)
        alive = self._wait_gone(alive, 10.0)
        if self._proc is not None and self._proc.pid in pids and self._proc.poll() is not None:
            self._proc = None
        if alive:
            raise KafkaLocalError(
                f"could not stop the Kafka broker (pid {', '.join(map(str, sorted(alive)))})"
            )

    def down(self, *, timeout_s: float = 30.0) -> bool:
        """Stop this home's broker (SIGTERM, SIGKILL after `timeout_s`); True if one ran."""
        self.root.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.root / ".lock"):
            pids = self._stray_pids()
            state = self._read_state()
            if state is not None and self._is_ours(state.pid):
                pids.add(state.pid)
            if self._proc is not None and self._proc.poll() is None:
                pids.add(self._proc.pid)
            self._stop_pids(pids, timeout_s)
            self.state_path.unlink(missing_ok=True)
            return bool(pids)
