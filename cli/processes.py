"""The parts a process stack (cli/stack.py) is made of: a real OS process it started (its log, signals, memory and
CPU, its process group), a free port, a PostgreSQL database made for it and dropped after, the venv's executables."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psycopg

NOISE = re.compile(r"Sending due task|chat\.(mark_dormant|purge_expired|sweep_\w*)")  # beat's once-a-second chatter


class StackError(RuntimeError):
    """A process did not start, exited, or a service is unreachable; the message carries the log tails."""


def venv_bin() -> Path:
    """The directory of the running interpreter's console scripts (the project's .venv/bin under make)."""
    return Path(sys.executable).parent


_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_port() -> int:
    """A TCP port nobody listens on now (and that this process did not hand out before)."""
    with _ports_lock:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _ports_given:
                _ports_given.add(port)
                return port


def create_database(pg_admin: str, name: str) -> str:
    """CREATE DATABASE `name` on the server of `pg_admin`; returns its psycopg URL. StackError if unreachable."""
    try:
        with psycopg.connect(pg_admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        raise StackError(f"PostgreSQL at {pg_admin} is not reachable (start it: make setup): {exc}") from None
    return f"{pg_admin.rsplit('/', 1)[0]}/{name}"


def drop_database(pg_admin: str, name: str) -> None:
    """DROP DATABASE `name` (WITH FORCE), after closing this process's own connections to it."""
    from shared.db import engine_for

    engine_for(sqlalchemy_url(f"{pg_admin.rsplit('/', 1)[0]}/{name}")).dispose()  # if this process used the store
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlalchemy_url(pg_url: str) -> str:
    return pg_url.replace("postgresql://", "postgresql+psycopg://", 1)


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]
    started_at: float = field(default_factory=time.time)
    stopped: bool = False  # ended on purpose (stop, terminate, kill), so not "exited unexpectedly"
    url: str = ""  # an ingress's http://127.0.0.1:<port>
    partitions: str = ""  # a pool's partitions ("0-7")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        """The last lines of the log, without beat's once-a-second sweep chatter."""
        text = [line for line in self.log().splitlines() if not NOISE.search(line)]
        return "\n".join(text[-lines:])

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> bool:
        try:
            self.popen.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill_group(self) -> None:
        """SIGKILL whatever is left of the process group it leads (e.g. gunicorn's workers)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def rss_mb(self) -> float:
        """Resident set size of the process (and its children, e.g. gunicorn's workers), in MiB."""
        total = 0
        for pid in [self.pid, *_children(self.pid)]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the process and its live children."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in [self.pid, *_children(self.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
        return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
