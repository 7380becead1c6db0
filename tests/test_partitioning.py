import subprocess
import sys

import pytest

from shared.partitioning import parse_partitions, partition_of, queue_name


def test_partition_is_stable_across_python_runs():
    """Python's hash() is salted per process; ours must give the same partition in every process."""
    keys = [f"acme-whatsapp:dm:55119876500{i:02d}" for i in range(20)]
    here = [partition_of(k, 16) for k in keys]
    code = f"from shared.partitioning import partition_of; print([partition_of(k, 16) for k in {keys!r}])"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        assert out.strip() == str(here)


def test_known_values_never_change():
    """Changing the hash would move live sessions to other partitions during a deploy."""
    keys = ["acme-telegram:dm:381920001", "acme-whatsapp:dm:5511987650001", "acme-discord:group:1290000000000000001"]
    assert [partition_of(k, 16) for k in keys] == [1, 15, 1]
    assert partition_of("acme-whatsapp:dm:5511987650001", 64) == 31


def test_partitions_spread_keys():
    counts = [0] * 16
    for i in range(16_000):
        counts[partition_of(f"chan:dm:{i}", 16)] += 1
    assert min(counts) > 800 and max(counts) < 1200


def test_queue_name():
    assert queue_name(3) == "sessions.3"


@pytest.mark.parametrize("spec, expected", [
    ("0-3", [0, 1, 2, 3]), ("0,2,5-6", [0, 2, 5, 6]), ("all", list(range(8))), ("7", [7]),
])
def test_parse_partitions(spec, expected):
    assert parse_partitions(spec, 8) == expected


@pytest.mark.parametrize("spec, message", [
    ("0-8", "out of range"), ("3-1", "bad partition range"), ("x", "bad partition range"), ("", "no partitions"),
])
def test_parse_partitions_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_partitions(spec, 8)
