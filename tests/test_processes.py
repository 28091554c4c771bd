"""ltexp.processes: /proc reading, pid identity and the launcher a process follows."""

import os
import subprocess
import sys
import time

import pytest

from ltexp import LtexpError, processes


def test_a_process_start_time_tells_a_live_process_from_a_reused_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = processes.process_start_time(child.pid)
        assert started is not None and abs(started - time.time()) < 60
        assert processes.pid_alive(child.pid, started)
        assert not processes.pid_alive(child.pid, started - 3600)  # another process had this pid an hour ago
    finally:
        child.kill()
        child.wait()
    assert processes.process_start_time(child.pid) is None and not processes.pid_alive(child.pid)


def test_proc_stat_reads_a_command_name_with_spaces_and_parentheses(tmp_path):
    # The name field of /proc/<pid>/stat is `(comm)`; a comm such as "a) (b" must not shift the fields.
    script = tmp_path / "a) (b"
    script.write_text("#!/bin/sh\nsleep 30\n")
    script.chmod(0o755)
    child = subprocess.Popen([str(script)])
    try:
        time.sleep(0.2)
        fields = processes._proc_stat(child.pid)
        assert fields is not None and fields[0] in "RSD" and int(fields[1]) == os.getpid()  # state, then ppid
    finally:
        child.kill()
        child.wait()


def test_a_parent_pid_variable_that_is_no_pid_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(processes.PARENT_ENV, "grid")
    with pytest.raises(LtexpError, match=r"LTEXP_PARENT_PID='grid' is not a process id") as err:
        processes.follow_launcher()
    assert "\n" not in str(err.value)
