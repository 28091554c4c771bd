"""bench/threads.py: the CPU thread benchmark runs, in both of its modes, and reports what it timed."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


def _run(*args):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "threads.py"), "--arch", "smallcnn",
                           "--batch-size", "16", "--warmup", "1", "--steps", "2", "--json", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_thread_counts_alone_and_beside_a_busy_process():
    rows = _run("--threads", "1,2", "--compete", "0,1")["rows"]
    assert [(r["competing"], r["threads"]) for r in rows] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(r["images_per_s"] > 0 and 0 < r["step_ms_median"] <= r["step_ms_max"] for r in rows)


def test_two_experts_in_turn_and_at_once():
    rows = _run("--experts", "2", "--repeat", "2")["experts"]
    assert [r["repeat"] for r in rows] == [0, 1]
    for r in rows:
        assert r["threads"] == 2 and r["sequential_s"] > 0 and r["concurrent_s"] > 0
        assert r["concurrent_over_sequential"] == pytest.approx(r["concurrent_s"] / r["sequential_s"])
