"""Worker liveness for Kubernetes (or any supervisor): a heartbeat file, fresh only while the consumer is connected.

A Celery consumer bootstep starts once the worker's consumer has connected to the broker and set up its
queues; from then on a timer of the consumer rewrites the heartbeat file every WORKER_HEARTBEAT_SECONDS
(default 10).
When the consumer loses the broker, Celery stops the consumer's steps (and restarts them on reconnect), so
the file goes stale; the same happens if the process hangs or dies. `chatsessions worker-alive --max-age 60`
is the exec probe: exit 0 while the file is younger than 60 s, 1 otherwise.

The file is WORKER_HEARTBEAT_FILE, default <tmp>/chatsessions-worker-<pid>.alive (then `worker-alive` takes the
newest such file of a running process). Importing this module registers the step (workers/app.py does); it
has no other import-time effect, so the CLI check can use it without loading the settings.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import tempfile
import time

from celery import bootsteps, signals

ENV_FILE = "WORKER_HEARTBEAT_FILE"  # the probe reads it itself: it checks a file, not the configuration
PREFIX = "chatsessions-worker-"
SUFFIX = ".alive"

log = logging.getLogger(__name__)


def heartbeat_file(configured: str | None = None, pid: int | None = None) -> str:
    """Where a worker process writes its heartbeat: WORKER_HEARTBEAT_FILE (Settings.heartbeat_file), or its own
    default file."""
    return configured or os.path.join(tempfile.gettempdir(), f"{PREFIX}{pid or os.getpid()}{SUFFIX}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _newest_default_file() -> str | None:
    """The freshest default-named heartbeat file of a process that still runs (one worker per container)."""
    best: tuple[float, str] | None = None
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{PREFIX}*{SUFFIX}")):
        try:
            pid = int(os.path.basename(path)[len(PREFIX):-len(SUFFIX)])
            mtime = os.stat(path).st_mtime
        except (ValueError, OSError):
            continue
        if _running(pid) and (best is None or mtime > best[0]):
            best = (mtime, path)
    return best[1] if best else None


def heartbeat_age(path: str | None = None) -> tuple[str, float | None]:
    """(the heartbeat file, seconds since its last beat or None if there is none)."""
    path = path or os.environ.get(ENV_FILE) or _newest_default_file()
    if not path:
        return os.path.join(tempfile.gettempdir(), f"{PREFIX}<pid>{SUFFIX}"), None
    try:
        return path, max(0.0, time.time() - os.stat(path).st_mtime)
    except OSError:
        return path, None


def probe(max_age_s: float, path: str | None = None) -> tuple[bool, str]:
    """The liveness verdict for `chatsessions worker-alive`: (alive, a line saying why)."""
    path, age = heartbeat_age(path)
    if age is None:
        return False, f"dead: no heartbeat file {path} (the worker has not connected to the broker yet, or is not running)"
    if age > max_age_s:
        return False, (f"dead: last heartbeat {age:.0f}s ago (over {max_age_s:g}s) in {path}: the consumer lost the "
                       "broker or hangs")
    return True, f"alive: last heartbeat {age:.0f}s ago ({path})"


def _touch(path: str, hostname: str) -> None:
    """Rewrite the file atomically (a probe never reads half a file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "hostname": hostname, "at": time.time()}, f)
    os.replace(tmp, path)


class Heartbeat(bootsteps.StartStopStep):
    """Touches the heartbeat file while the consumer is connected (a consumer step: stopped on connection loss).

    The beat is a timer entry of the consumer: with the Redis transport it fires from the consumer's own event
    loop, so a hung loop stops the beats as surely as a lost connection does."""

    requires = ("celery.worker.consumer.tasks:Tasks",)  # started after the queues are consumed

    def __init__(self, c, **kwargs):
        from shared.config import get_settings  # the worker's own, already validated

        super().__init__(c, **kwargs)
        settings = get_settings()
        self.path = heartbeat_file(settings.heartbeat_file)
        self.interval = settings.heartbeat_seconds
        self._tref = None

    def start(self, c) -> None:
        self.stop(c)
        hostname = getattr(c, "hostname", None) or socket.gethostname()
        self._beat(c, hostname)
        self._tref = c.timer.call_repeatedly(self.interval, self._beat, (c, hostname))

    def _beat(self, c, hostname: str) -> None:
        if getattr(c, "connection", None) is None:  # lost: the consumer restarts its steps
            return
        try:
            _touch(self.path, hostname)
        except OSError as exc:
            log.warning("worker heartbeat file %s not written: %s", self.path, exc)

    def stop(self, c) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None

    def shutdown(self, c) -> None:
        self.stop(c)
        try:
            os.unlink(self.path)
        except OSError:
            pass


@signals.celeryd_init.connect
def _install(sender=None, instance=None, **_kwargs) -> None:
    """Add the step to the worker's consumer before the consumer is built (`celery worker` only)."""
    if instance is not None:
        instance.app.steps["consumer"].add(Heartbeat)
