"""Fetch the tokenizer test data: llama.cpp's vocab-only GGUF files and tokenizer vectors.

llama.cpp keeps, in its `models/` folder, vocab-only GGUF files (real tokenizer metadata, no
tensors) with the test vectors of its `test-tokenizer-0`: `X.gguf.inp` holds the input strings, each
followed by a line `__ggml_vocab_test__`; `X.gguf.out` holds, line by line, the ids llama.cpp
produces for each (no BOS/EOS added, special-token text not parsed). PyPI's `llama-cpp-python`
source distribution vendors that folder under `vendor/llama.cpp/models/`.

`pull_testdata` downloads the sdist once with pip, streams the members we need out of the tarball,
checks each against the sha256 recorded here and renames it into the cache only then (see
`hub.write_verified`), so a file in the cache is always a verified one and a second run is a no-op.
"""

from __future__ import annotations

import logging
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from worker_orcd.hub import FetchError, cache_root, pip_download, write_verified

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SdistSource:
    """Files inside the source distribution `package==version`, under `folder`."""

    package: str
    version: str
    folder: str
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    @property
    def top(self) -> str:
        """The sdist's top-level directory (`name-version`, name normalised as in its filename)."""
        return f"{self.package.replace('-', '_')}-{self.version}"

    def member(self, name: str) -> str:
        return f"{self.top}/{self.folder}/{name}"


def sha256sums(text: str) -> dict[str, str]:
    """`sha256sum` output ("<hex>  <name>" lines) -> {name: hex}."""
    sums = {}
    for line in text.strip().splitlines():
        digest, name = line.split()
        sums[name] = digest
    return sums


# llama.cpp commit 0c1e5709, as vendored by llama-cpp-python 0.3.36.
VOCAB_TESTDATA = SdistSource(
    package="llama-cpp-python",
    version="0.3.36",
    folder="vendor/llama.cpp/models",
    files=sha256sums(
        """
16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69  ggml-vocab-llama-spm.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-llama-spm.gguf.inp
ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29  ggml-vocab-llama-spm.gguf.out
967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326  ggml-vocab-phi-3.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-phi-3.gguf.inp
ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29  ggml-vocab-phi-3.gguf.out
44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c  ggml-vocab-qwen2.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-qwen2.gguf.inp
de785bb305cc6fa9d43908ed5da337f853c0b79e971348fcfb9f0915a39c5363  ggml-vocab-qwen2.gguf.out
"""
    ),
)


def testdata_dir(source: SdistSource = VOCAB_TESTDATA) -> Path:
    """Where the files of `source` live: <cache>/testdata/<package>-<version>/."""
    return cache_root() / "testdata" / f"{source.package}-{source.version}"


def missing(source: SdistSource = VOCAB_TESTDATA) -> list[str]:
    """Names of the files of `source` that are not in the cache yet."""
    folder = testdata_dir(source)
    return [name for name in source.files if not (folder / name).is_file()]


def pull_testdata(source: SdistSource = VOCAB_TESTDATA) -> Path:
    """Put every file of `source` into the cache, verified; a no-op when they are all there."""
    folder = testdata_dir(source)
    wanted = missing(source)
    if not wanted:
        logger.info("test data already present: %s", folder)
        return folder
    with tempfile.TemporaryDirectory(prefix="worker-orcd-testdata-") as tmp:
        sdist = _download_sdist(source, Path(tmp))
        extract_verified(sdist, source, wanted, folder)
    logger.info("test data ready: %s (%d files)", folder, len(source.files))
    return folder


def _download_sdist(source: SdistSource, dest: Path) -> Path:
    # --no-binary for this package only: its build requirements (pip prepares the sdist's
    # metadata) still come as wheels.
    spec = f"{source.package}=={source.version}"
    pip_download([spec], dest, "--no-binary", source.package)
    path = dest / f"{source.top}.tar.gz"
    if not path.is_file():
        raise FetchError(f"pip did not produce the source distribution {path.name} for {spec}")
    return path


def extract_verified(sdist: Path, source: SdistSource, names: list[str], folder: Path) -> None:
    """Stream the members `names` of `source` out of the tarball `sdist` into `folder`.

    One pass over the archive; each file is checked against its recorded sha256 and written
    atomically. A member that is missing, not a regular file, or whose digest differs raises
    `FetchError` and leaves no file behind for it.
    """
    members = {source.member(name): name for name in names}
    found: set[str] = set()
    try:
        with tarfile.open(sdist, "r:*") as tf:
            for info in tf:
                name = members.get(info.name)
                if name is None:
                    continue
                stream = tf.extractfile(info) if info.isfile() else None
                if stream is None:
                    raise FetchError(f"{sdist.name}: {info.name} is not a regular file")
                write_verified(folder / name, _chunks(stream), source.files[name])
                found.add(name)
    except (OSError, tarfile.TarError) as e:
        raise FetchError(f"cannot extract test data from {sdist.name}: {e}") from e
    absent = sorted(set(names) - found)
    if absent:
        raise FetchError(f"{sdist.name} lacks {', '.join(source.member(n) for n in absent)}")


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(1 << 20):
        yield chunk
