"""Rank 0 in a child process, for tests that must see every rank exit (or kill them if not).

The ranks inherit the child's stdout and stderr, so `subprocess.run(capture_output=True)` returns
only once rank 0 and every follower have exited: waiting on it is waiting on all of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Loads a 2-rank engine, writes the followers' pids, then runs `then`.
_SCRIPT = """
import os, signal, sys
import worker_orcd.engine.engine as engine_module
from tests.parallel.shards import FailingPass
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.parallel import GGUFShard, TensorParallelError
from worker_orcd.engine.types import SamplingParams
path, device, pids, failing = sys.argv[1:5]
if failing == "1":
    engine_module.GGUFShard = lambda *a: FailingPass(GGUFShard(*a), 1)
engine = Engine.load(path, device=device, max_context=64, tensor_parallel_size=2)
with open(pids, "w") as f:
    f.write(" ".join(str(p.pid) for p in engine.runner.group.procs))
"""
THEN_DIE = "os.kill(os.getpid(), signal.SIGKILL)\n"
THEN_FAIL = """
try:
    engine.generate("Hello", SamplingParams(max_tokens=4, temperature=0.0))
except TensorParallelError as e:
    print("raised:", e, flush=True)
"""


def run_rank0(
    path: Path, device: str, tmp: Path, then: str, *, failing: bool = False, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run rank 0 of a 2-rank engine on `path` in a child, then `then` (THEN_DIE, THEN_FAIL);
    returns once every rank has exited, or kills them all and raises TimeoutExpired."""
    pids = tmp / "pids"
    script = textwrap.dedent(_SCRIPT) + then
    argv = [sys.executable, "-c", script, str(path), device, str(pids), "1" if failing else "0"]
    try:
        return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in pids.read_text().split() if pids.exists() else []:
            os.kill(int(pid), signal.SIGKILL)
        raise
