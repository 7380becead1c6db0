"""Session key -> partition -> Celery queue. Stable across processes and Python runs."""

from __future__ import annotations

import hashlib

QUEUE_PREFIX = "sessions."


def partition_of(session_key: str, partitions: int) -> int:
    """A stable hash (blake2b, not Python's salted hash()) of the key, modulo the partition count."""
    digest = hashlib.blake2b(session_key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def queue_name(partition: int) -> str:
    return f"{QUEUE_PREFIX}{partition}"


def parse_partitions(spec: str, partitions: int) -> list[int]:
    """Parse "0-7", "0,2,4-5" or "all" into sorted partition numbers, each < partitions."""
    if spec.strip() == "all":
        return list(range(partitions))
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                chosen.update(range(lo, hi + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise ValueError(f"bad partition range {part!r}: use e.g. 0-7 or 0,3,5-6") from None
    if not chosen:
        raise ValueError("no partitions given")
    bad = [p for p in chosen if p < 0 or p >= partitions]
    if bad:
        raise ValueError(f"partitions {sorted(bad)} out of range 0-{partitions - 1}")
    return sorted(chosen)
