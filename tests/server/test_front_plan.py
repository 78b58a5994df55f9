"""`serve --data-parallel-size`: bad sizes, where each replica runs and with what command line, how
the front picks a replica, and the relabelled metrics. No model is loaded here
(test_front_live.py runs the front on the real model)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.live_server import serve_command
from worker_orcd import cli
from worker_orcd.server import front_status
from worker_orcd.server.options import ServerSettings
from worker_orcd.server.replica_plan import FRONT_ONLY, ReplicaPlan, plan_replicas
from worker_orcd.server.replicas import ReplicaSet, ReplicaState


def _args(*flags: str, model: str = "m.gguf"):  # noqa: ANN202 - an argparse.Namespace
    return cli.build_parser().parse_args(["serve", "--model", model, "--port", "0", *flags])


def _plans(*flags: str) -> list[ReplicaPlan]:
    args = _args(*flags)
    return plan_replicas(args, ServerSettings.from_args(args))


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_size_zero_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _args("--data-parallel-size", "0")
    assert exit_info.value.code == 2
    assert "--data-parallel-size: must be an integer >= 1 (got 0)" in capsys.readouterr().err


def test_more_gpus_than_exist_is_refused(four_gpus: None) -> None:
    with pytest.raises(ValueError, match=r"needs 6 CUDA devices \(cuda:0 \.\. cuda:5\); 4 are"):
        _plans("--device", "cuda", "--data-parallel-size", "3", "--tensor-parallel-size", "2")
    with pytest.raises(ValueError, match=r"from cuda:2 needs 3 CUDA devices"):
        _plans("--device", "cuda", "--gpu-device", "2", "--data-parallel-size", "3")
    plans = _plans("--device", "cuda", "--gpu-device", "1", "--data-parallel-size", "3")
    assert [p.device for p in plans] == ["cuda:1", "cuda:2", "cuda:3"]


def test_cuda_without_a_gpu_ends_the_front_with_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    argv = ["serve", "--model", str(model), "--port", "0", "--device", "cuda", "--worker-id", "w"]
    with caplog.at_level(logging.INFO, logger="worker_orcd"):
        code = cli.main([*argv, "--data-parallel-size", "2"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "error worker_id=w code=INVALID_ARGUMENT "
        'message="--device cuda was asked for but CUDA is not available"'
    ]


def test_missing_model_ends_the_front_before_any_replica_starts(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    missing = tmp_path / "absent.gguf"
    argv = ["serve", "--model", str(missing), "--port", "0", "--device", "cpu"]
    with caplog.at_level(logging.INFO, logger="worker_orcd"):
        assert cli.main([*argv, "--data-parallel-size", "2", "--worker-id", "w"]) == 1
    events = [r.getMessage().split()[0] for r in caplog.records]
    assert events == ["error"] and "MODEL_LOAD_FAILED" in caplog.records[0].getMessage()


def test_a_replica_that_cannot_load_ends_the_front_with_its_reason(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 60)
    proc = subprocess.run(
        serve_command(bad, "--data-parallel-size", "2", "--worker-id", "doomed"),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 1
    records = [json.loads(line) for line in proc.stderr.decode().splitlines() if line.strip()]
    front = [r for r in records if r["level"] == "ERROR" and r["worker_id"] == "doomed"]
    assert len(front) == 1 and front[0]["code"] == "REPLICA_FAILED", records
    assert "before it was ready" in front[0]["message"]
    assert "unsupported GGUF version 0" in front[0]["message"]  # the replica's own reason
    assert not [r for r in records if r.get("event") in ("ready", "replica_ready")]
    exits = [r for r in records if r.get("event") == "replica_exit"]
    assert sorted(r["replica"] for r in exits) == [0, 1]  # the other one is stopped too


def test_each_replica_gets_its_gpus_and_the_front_options_but_its_own(four_gpus: None) -> None:
    flags = ["--device", "cuda", "--data-parallel-size", "2", "--tensor-parallel-size", "2"]
    flags += ["--worker-id", "front", "--callback-url", "http://x/ready", "--host", "0.0.0.0"]
    flags += ["--max-queue", "3", "--max-tokens-out", "17", "--dtype", "float32"]
    flags += ["--weights", "quantized", "--max-context", "128", "--inference-timeout-sec", "12.5"]
    flags += ["--max-num-seqs", "7", "--log-format", "text"]
    front = _args(*flags)
    plans = plan_replicas(front, ServerSettings.from_args(front))
    assert [p.device for p in plans] == ["cuda:0", "cuda:2"]
    for plan in plans:
        assert plan.argv[:3] == (sys.executable, "-m", "worker_orcd.server.child")
        child = cli.build_parser().parse_args(list(plan.argv[3:]))
        assert child.command == "serve" and child.data_parallel_size == 1
        assert (child.device, child.gpu_device) == ("cuda", 2 * plan.index)
        assert (child.host, child.port, child.log_format) == ("127.0.0.1", 0, "json")
        assert child.worker_id == f"front-r{plan.index}" and child.callback_url is None
        # Every other option reaches the replica as the front was given it.
        for dest in set(vars(front)) - FRONT_ONLY - {"func", "command"}:
            assert getattr(child, dest) == getattr(front, dest), dest
        assert child.tensor_parallel_size == 2 and child.max_queue == 3
        assert plan.env["NCCL_NVLS_ENABLE"] == "0"
        assert plan.env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"


def test_cpu_replicas_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    plans = _plans("--device", "cpu", "--data-parallel-size", "3")
    assert [p.env["OMP_NUM_THREADS"] for p in plans] == ["2", "2", "2"]
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert _plans("--device", "cpu", "--data-parallel-size", "2")[0].env["OMP_NUM_THREADS"] == "5"


def _replica_set(n: int) -> ReplicaSet:
    replicas = ReplicaSet(
        [ReplicaPlan(index=i, device="cpu", argv=(), env={}) for i in range(n)], worker_id="w"
    )
    for r in replicas.replicas:
        r.state = ReplicaState.UP
    return replicas


def test_pick_takes_the_least_busy_and_goes_round_robin_among_equals() -> None:
    replicas = _replica_set(3)
    r0, r1, r2 = replicas.replicas
    assert [replicas.pick() for _ in range(4)] == [r0, r1, r2, r0]  # all idle
    r0.in_flight, r1.in_flight, r2.in_flight = 2, 1, 1
    assert replicas.pick() is r1  # the next equal one after r0, the last chosen
    assert replicas.pick() is r2
    r2.in_flight = 3
    assert [replicas.pick() for _ in range(2)] == [r1, r1]
    r1.state = ReplicaState.STARTING  # only ready replicas take requests
    assert replicas.pick() is r0 and replicas.pick(exclude=[r0]) is r2
    r0.state = r2.state = ReplicaState.DOWN
    assert replicas.pick() is None


def test_metrics_carry_the_replica_label_and_the_front_counters() -> None:
    texts = {}
    for index, served in ((0, 3), (1, 5)):
        registry = CollectorRegistry()
        requests = Counter("worker_orcd_requests", "Requests", ["outcome"], registry=registry)
        requests.labels(outcome="completed").inc(served)
        hist = Histogram("worker_orcd_decode_seconds", "Decode", buckets=(1.0,), registry=registry)
        hist.observe(0.5 * (index + 1))
        texts[index] = generate_latest(registry).decode()
    replicas = _replica_set(2)
    replicas.replicas[1].served = {"execute": 4}
    replicas.replicas[1].restarts = 1
    registry = CollectorRegistry(auto_describe=False)
    registry.register(front_status._Collector(replicas, texts))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    done = (("outcome", "completed"),)
    assert samples[("worker_orcd_requests_total", (*done, ("replica", "0")))] == 3
    assert samples[("worker_orcd_requests_total", (*done, ("replica", "1")))] == 5
    le1 = (("le", "1.0"), ("replica", "1"))
    assert samples[("worker_orcd_decode_seconds_bucket", le1)] == 1  # 1.0 s: not above 1.0
    assert samples[("worker_orcd_decode_seconds_sum", (("replica", "0"),))] == 0.5
    key = ("worker_orcd_replica_requests_total", (("endpoint", "execute"), ("replica", "1")))
    assert samples[key] == 4
    assert samples[("worker_orcd_replica_restarts_total", (("replica", "1"),))] == 1
    assert samples[("worker_orcd_replica_up", (("replica", "0"),))] == 1
