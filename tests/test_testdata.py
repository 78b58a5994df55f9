"""The test-data fetcher, offline: a small sdist-shaped tarball built here stands in for PyPI's."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from worker_orcd import testdata
from worker_orcd.hub import FetchError
from worker_orcd.testdata import SdistSource

FILES = {"vocab.gguf": b"GGUF" + bytes(range(256)) * 64, "vocab.gguf.inp": "héllo\n".encode()}


def _source(**wrong: str) -> SdistSource:
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}
    return SdistSource("fake-pkg", "1.0", "vendor/models", files=sums | wrong)


def _sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """An empty cache, and a download step that hands out fake_pkg-1.0.tar.gz; returns the list
    of downloads made."""
    monkeypatch.setenv("WORKER_ORCD_CACHE", str(tmp_path / "cache"))
    members = {f"fake_pkg-1.0/vendor/models/{n}": d for n, d in FILES.items()}
    members["fake_pkg-1.0/vendor/models/other.gguf"] = b"not asked for"
    members["fake_pkg-1.0/setup.py"] = b""
    sdist = _sdist(tmp_path / "fake_pkg-1.0.tar.gz", members)
    downloads: list[Path] = []

    def download(source: SdistSource, dest: Path) -> Path:
        downloads.append(dest)
        return sdist

    monkeypatch.setattr(testdata, "_download_sdist", download)
    return downloads


def test_pull_writes_verified_files_then_is_a_no_op(fake_pypi: list[Path]) -> None:
    source = _source()
    folder = testdata.pull_testdata(source)
    assert folder == testdata.testdata_dir(source)
    assert folder.parent.name == "testdata" and folder.name == "fake-pkg-1.0"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    for name, data in FILES.items():
        assert (folder / name).read_bytes() == data
    stats = {name: (folder / name).stat() for name in FILES}
    assert len(fake_pypi) == 1 and testdata.missing(source) == []

    assert testdata.pull_testdata(source) == folder
    assert len(fake_pypi) == 1  # nothing downloaded
    for name, st in stats.items():
        again = (folder / name).stat()
        assert (again.st_ino, again.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)


def test_hash_mismatch_is_a_clear_error_and_leaves_no_file(fake_pypi: list[Path]) -> None:
    wrong = "0" * 64
    match = f"sha256 mismatch for vocab.gguf.inp: expected {wrong}, got "
    with pytest.raises(FetchError, match=match):
        testdata.pull_testdata(_source(**{"vocab.gguf.inp": wrong}))
    folder = testdata.testdata_dir(_source())
    assert sorted(p.name for p in folder.iterdir()) == ["vocab.gguf"]  # no .partial left either

    # The file that did verify (it comes first in the tarball) stays; the next pull fetches only
    # what is missing.
    assert testdata.missing(_source()) == ["vocab.gguf.inp"]
    testdata.pull_testdata(_source())
    assert (folder / "vocab.gguf.inp").read_bytes() == FILES["vocab.gguf.inp"]


def test_member_missing_from_the_sdist(fake_pypi: list[Path]) -> None:
    source = _source(**{"absent.out": "1" * 64})
    with pytest.raises(FetchError, match="lacks fake_pkg-1.0/vendor/models/absent.out"):
        testdata.pull_testdata(source)
    assert not (testdata.testdata_dir(source) / "absent.out").exists()


def test_member_that_is_not_a_file(tmp_path: Path) -> None:
    sdist = tmp_path / "fake_pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("fake_pkg-1.0/vendor/models/vocab.gguf")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(FetchError, match="vocab.gguf is not a regular file"):
        testdata.extract_verified(sdist, _source(), ["vocab.gguf"], tmp_path / "out")
    assert not (tmp_path / "out" / "vocab.gguf").exists()


def test_corrupt_sdist(tmp_path: Path) -> None:
    sdist = tmp_path / "fake_pkg-1.0.tar.gz"
    sdist.write_bytes(b"\x1f\x8b\x08 this is no gzip stream")
    with pytest.raises(FetchError, match="cannot extract test data from fake_pkg-1.0.tar.gz"):
        testdata.extract_verified(sdist, _source(), ["vocab.gguf"], tmp_path / "out")


def test_pip_producing_no_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testdata, "pip_download", lambda *args, **kwargs: None)
    with pytest.raises(FetchError, match="did not produce the source distribution"):
        testdata._download_sdist(_source(), tmp_path)


def test_recorded_files_are_the_vocab_set() -> None:
    names = {
        f"ggml-vocab-{v}.gguf{ext}"
        for v in ("phi-3", "qwen2", "llama-spm")
        for ext in ("", ".inp", ".out")
    }
    assert set(testdata.VOCAB_TESTDATA.files) == names
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in testdata.VOCAB_TESTDATA.files.values())
    assert testdata.VOCAB_TESTDATA.member("ggml-vocab-qwen2.gguf") == (
        "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"
    )
