"""The ceiling of `chatsessions bench`: a no-op task on a Celery app built exactly like the workers' one
(shared.queueing.make_celery, same broker and settings), consumed with the same worker flags.

    celery -A cli.bench_ceiling worker ...   # what Stack.start_pool(..., app="cli.bench_ceiling") runs

Bench-only: nothing in the product imports this module.
"""

from __future__ import annotations

from shared.config import get_settings
from shared.queueing import make_celery

NOOP = "bench.noop"

settings = get_settings()
app = make_celery(settings)


@app.task(name=NOOP, acks_late=True)
def noop(message: dict) -> None:
    """Takes a message shaped like the real task's argument and does nothing with it."""
    return
