"""A process that used the engine and exits without Engine.close() exits cleanly.

generate() returns as soon as on_done has run, inside the engine thread's step; the step then goes
on (freeing its tensors, the step observer, a device-fed read). A daemon thread ended by the
interpreter at exit while inside torch aborts the process ("terminate called without an active
exception"), so the engine threads are stopped at exit first. Here the step's tail is lengthened by
a step observer doing torch work, so an abort would be certain.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.hf_gguf import make_phi3, write_gguf

SCRIPT = """
import sys
import torch
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.types import SamplingParams

engine = Engine.load(sys.argv[1], max_context=256)
x = torch.randn(256, 256)

def tail(n_seqs, n_tokens):  # the step goes on in torch after its request has ended
    for _ in range(200):
        x @ x

engine.set_step_observer(tail)
out = engine.generate([5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0))
print(len(out.token_ids))
"""


def test_exit_without_close_does_not_abort(tmp_path: Path) -> None:
    path = write_gguf(make_phi3(), tmp_path / "phi3.gguf")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 and "terminate called" not in done.stderr:
        pytest.fail(f"the script itself failed: {done.stderr[-2000:]}")
    assert done.stdout.strip() == "2"
    assert done.returncode == 0, done.stderr[-500:]
