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


def test_thread_counts_alone_and_beside_a_busy_process_against_the_default():
    result = _run("--threads", "1,2,default", "--compete", "0,1")
    rows = result["rows"]
    assert [(r["competing"], r["threads"], r["policy"]) for r in rows if r["policy"] == "fixed"] == \
        [(0, 1, "fixed"), (0, 2, "fixed"), (1, 1, "fixed"), (1, 2, "fixed")]
    assert all(r["images_per_s"] > 0 and 0 < r["step_ms_median"] <= r["step_ms_max"] for r in rows)
    summary = result["default_against_best"]
    assert [s["competing"] for s in summary] == [0, 1]
    for s in summary:
        level = {(r["policy"], r["threads"]): r["images_per_s"] for r in rows if r["competing"] == s["competing"]}
        best = max(v for (policy, _), v in level.items() if policy == "fixed")
        assert s["best_over_default"] == pytest.approx(best / level[("default", s["default_threads"])])


def test_two_experts_in_turn_and_at_once():
    rows = _run("--experts", "2", "--repeat", "2")["experts"]
    assert [r["repeat"] for r in rows] == [0, 1]
    for r in rows:
        assert r["threads"] == 2 and r["sequential_s"] > 0 and r["concurrent_s"] > 0
        assert r["concurrent_over_sequential"] == pytest.approx(r["concurrent_s"] / r["sequential_s"])
