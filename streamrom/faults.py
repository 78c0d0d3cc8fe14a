"""The points where the reliability tests make a run fail as a crash, Ctrl-C or a stop would.

A named point in the code (after a block is written, before a shard is renamed, during a trial) does
nothing unless the environment names it: STREAMROM_FAULT=<name> kills the process there with SIGKILL,
sigint:<name> sends it SIGINT, stop:<name> stops it (SIGSTOP) until the test sends SIGCONT. Kept apart
from the stages so that they only name their points (the kill harness finds the others itself, from the
log lines and moments between: tests/kill_harness.py).
"""
from __future__ import annotations

import os
import signal

ENVIRONMENT = "STREAMROM_FAULT"


def fault_point(name: str) -> None:
    fault = os.environ.get(ENVIRONMENT)
    if fault is None:
        return
    if fault == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"sigint:{name}":
        os.kill(os.getpid(), signal.SIGINT)
    elif fault == f"stop:{name}":  # held there until the test sends SIGCONT
        os.kill(os.getpid(), signal.SIGSTOP)
