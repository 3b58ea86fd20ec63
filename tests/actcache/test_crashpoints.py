"""The fault points the crash and deployment tests inject (actcache/crashpoints.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A stalled point, and a SIGTERM that reaches another thread of the process (as it may in a flow-run process with
# its client, log and task-runner threads): Python runs the handler in the stalled main thread all the same.
STALL_THEN_SIGTERM = """
import signal, threading, time
from actcache import crashpoints

class Stopped(Exception):
    pass

def stop(*_):
    raise Stopped

signal.signal(signal.SIGTERM, stop)

def other_thread():
    time.sleep(0.5)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

threading.Thread(target=other_thread).start()
try:
    crashpoints.point("extract.forward-done")
except Stopped:
    print("stopped")
"""


@pytest.mark.subprocess
def test_a_stalled_point_still_handles_sigterm_as_a_slow_forward_pass_does():
    env = {**os.environ, "ACTCACHE_FAULT": "extract.forward-done:1:hang"}
    done = subprocess.run(
        [sys.executable, "-c", STALL_THEN_SIGTERM], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "stopped", done.stderr[-2000:]
