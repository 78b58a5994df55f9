"""A replica's process: `worker-orcd serve` that ends when the data-parallel front that started it
ends.

The front (replicas.py) runs `python -m worker_orcd.server.child [worker-orcd arguments]` with its
own pid in WORKER_ORCD_FRONT_PID. On Linux the kernel then sends the replica SIGTERM when the front
dies, by SIGKILL too, so that no replica outlives its front holding a GPU; the replica shuts down as
`serve` does on SIGTERM.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

FRONT_PID_ENV = "WORKER_ORCD_FRONT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main() -> int:
    front = os.environ.get(FRONT_PID_ENV)
    if front and sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != int(front):  # the front died before the signal was armed
            return 1
    from worker_orcd.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
