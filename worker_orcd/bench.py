"""`worker-orcd bench`: prefill and decode speed, beside a peer."""

from __future__ import annotations

import argparse


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
