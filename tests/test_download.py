"""Downloads resume, verify and fail loudly — against a local HTTP server."""

from __future__ import annotations

import hashlib
import re

import pytest
from fixtures_real import build_afhq, build_celeba, build_inat, serve

from diffrepro.data import download as dl
from diffrepro.errors import UserError

BODY = bytes(range(256)) * 1000  # 256 kB: several read chunks would not matter, bytes do
BODY_MD5 = hashlib.md5(BODY).hexdigest()
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()


def test_complete_download_is_verified_and_leaves_no_part(tmp_path):
    with serve({"/f.bin": BODY}) as (url, state):
        out = dl.download(f"{url}/f.bin", tmp_path / "f.bin", md5=BODY_MD5, progress=False)
    assert out.read_bytes() == BODY
    assert not (tmp_path / "f.bin.part").exists()
    assert state.requests == [("/f.bin", None)]


def test_cut_connection_resumes_with_a_range_request(tmp_path):
    cut = 100_003
    with serve({"/f.bin": BODY}, cut_after=cut) as (url, state):
        dl.download(f"{url}/f.bin", tmp_path / "f.bin", sha256=BODY_SHA256, progress=False)
    assert hashlib.sha256((tmp_path / "f.bin").read_bytes()).hexdigest() == BODY_SHA256
    assert state.requests == [("/f.bin", None), ("/f.bin", f"bytes={cut}-")]


def test_partial_file_from_a_killed_run_is_resumed(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(BODY[:5000])
    with serve({"/f.bin": BODY}) as (url, state):
        dl.download(f"{url}/f.bin", tmp_path / "f.bin", md5=BODY_MD5, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == BODY
    assert state.requests == [("/f.bin", "bytes=5000-")]


def test_server_ignoring_range_restarts_from_zero(tmp_path):
    # The stale partial bytes are wrong: appending the 200 body to them would fail the md5.
    (tmp_path / "f.bin.part").write_bytes(b"\xff" * 7000)
    with serve({"/f.bin": BODY}, ignore_range=True) as (url, state):
        dl.download(f"{url}/f.bin", tmp_path / "f.bin", md5=BODY_MD5, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == BODY
    assert state.requests == [("/f.bin", "bytes=7000-")]


def test_corrupt_download_is_deleted_and_named(tmp_path):
    bad = BODY[:-1] + b"\x00"
    dest = tmp_path / "f.bin"
    with serve({"/f.bin": bad}) as (url, _), pytest.raises(UserError) as err:
        dl.download(f"{url}/f.bin", dest, md5=BODY_MD5, progress=False)
    message = str(err.value)
    assert str(dest) in message and BODY_MD5 in message
    assert hashlib.md5(bad).hexdigest() in message and "run again" in message
    assert not dest.exists() and not (tmp_path / "f.bin.part").exists()


def test_unpublished_checksum_is_recorded_and_then_enforced(tmp_path):
    dest = tmp_path / "f.bin"
    with serve({"/f.bin": BODY}) as (url, state):
        dl.download(f"{url}/f.bin", dest, progress=False)
        assert (tmp_path / "f.bin.sha256").read_text() == f"{BODY_SHA256}  f.bin\n"
        dest.write_bytes(b"damaged later")
        dl.download(f"{url}/f.bin", dest, progress=False)  # detected via the record: fetched again
    assert dest.read_bytes() == BODY and len(state.requests) == 2


def test_http_404_is_one_clear_line_without_retries(tmp_path):
    with serve({}) as (url, state), pytest.raises(UserError, match="HTTP 404") as err:
        dl.download(f"{url}/missing.tar.gz", tmp_path / "m.tar.gz", progress=False)
    assert "\n" not in str(err.value) and len(state.requests) == 1


def test_fetch_inat2021_downloads_every_file_verified(tmp_path, monkeypatch):
    build_inat(tmp_path / "served")
    names = [f.name for f in dl.REAL_FILES["inat2021"]]
    files = {f"/2021/{n}": (tmp_path / "served" / n).read_bytes() for n in names}
    with serve(files) as (url, _):
        monkeypatch.setitem(dl.REAL_FILES, "inat2021", tuple(
            dl.RealFile(n, f"{url}/2021/{n}", md5=hashlib.md5(files[f"/2021/{n}"]).hexdigest())
            for n in names))
        dl.download_dataset("inat2021", tmp_path / "raw", progress=False)
    for n in names:
        assert (tmp_path / "raw" / n).read_bytes() == files[f"/2021/{n}"]


def test_manual_dataset_says_which_files_go_where(tmp_path):
    raw = tmp_path / "raw" / "celeba"
    with pytest.raises(UserError) as err:
        dl.download_dataset("celeba64", raw)
    message = str(err.value)
    assert "\n" not in message and str(raw) in message
    for f in dl.REAL_FILES["celeba"]:
        assert f.name in message and f.md5 in message
    assert "0B7EVK8r0v71pZjFTYXZWM3FlRnM" in message  # the Drive id of img_align_celeba.zip


def test_manual_file_with_wrong_md5_is_named_and_kept(tmp_path, monkeypatch):
    raw = tmp_path / "celeba"
    build_celeba(raw)
    with pytest.raises(UserError) as err:
        dl.download_dataset("celeba64", raw)  # our tiny zip is not the published one
    assert str(raw / "img_align_celeba.zip") in str(err.value)
    assert "00d2c5bc6d35e252742224ab0c1e8fcb" in str(err.value)
    assert (raw / "img_align_celeba.zip").exists()  # the user's file is never deleted
    monkeypatch.setitem(dl.REAL_FILES, "celeba", tuple(
        dl.RealFile(f.name, None, md5=hashlib.md5((raw / f.name).read_bytes()).hexdigest())
        for f in dl.REAL_FILES["celeba"]))
    dl.download_dataset("celeba64", raw)  # matching checksums pass


def test_manual_file_without_published_checksum_gets_its_sha256_recorded(tmp_path):
    raw = tmp_path / "afhqv2"
    build_afhq(raw)
    dl.download_dataset("afhqv2wild_64", raw)
    sha = hashlib.sha256((raw / "afhq_v2.zip").read_bytes()).hexdigest()
    assert (raw / "afhq_v2.zip.sha256").read_text().split() == [sha, "afhq_v2.zip"]
    (raw / "afhq_v2.zip").write_bytes(b"replaced by something else")
    with pytest.raises(UserError, match="afhq_v2.zip: sha256 mismatch"):
        dl.download_dataset("afhqv2_64", raw)


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(UserError) as err:
        dl.download_dataset("cifar10", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "'cifar10'" in message
    assert all(name in message for name in dl.DATASET_SOURCES)


def test_registry_checksums_are_well_formed_or_explicitly_unknown():
    """A typo in a copied hash would make every real download fail; catch it here."""
    for files in dl.REAL_FILES.values():
        for f in files:
            assert f.md5 is None or re.fullmatch(r"[0-9a-f]{32}", f.md5), f.name
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256), f.name
            assert f.url is not None or f.how, f"{f.name}: a hand-placed file must say where from"
