"""`loda data download` and `loda train --download`, against a loopback HTTP server on 127.0.0.1
serving small archives in each dataset's real layout. No test touches the network."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import socket
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loda_cli import download, unpack
from loda_cli.cli.main import app
from loda_cli.download import Archive
from tests.datasetfixtures import make_kadid, make_koniq, make_tid2013
from tests.loopback import Loopback

runner = CliRunner()
REPO = Path(__file__).parent.parent
KADID_PATH = "/archives/kadid10k.zip"
TINY_TRAIN = ["--vit", "test_vit", "--vit-depth", "1", "--cnn", "test_resnet", "--no-pretrained", "--epochs", "1",
              "--workers", "0", "--precision", "fp32"]


def zip_folder(folder: Path, prefix: str, compression: int = zipfile.ZIP_DEFLATED, extra=()) -> bytes:
    """``folder`` zipped under ``prefix/`` with directory entries, as the real archives are,
    plus ``extra`` (ZipInfo or name, bytes) entries."""
    out = folder.parent / f"{folder.name}-{prefix or 'flat'}.zip"
    with zipfile.ZipFile(out, "w", compression) as zf:
        if prefix:
            zf.writestr(prefix + "/", b"")
        for path in sorted(folder.rglob("*")):
            name = "/".join(filter(None, [prefix, path.relative_to(folder).as_posix()]))
            if path.is_dir():
                zf.writestr(name + "/", b"")
            else:
                zf.write(path, name)
        for info, data in extra:
            zf.writestr(info, data)
    return out.read_bytes()


@pytest.fixture(scope="module")
def kadid_tree(tmp_path_factory) -> Path:
    return make_kadid(tmp_path_factory.mktemp("src") / "kadid10k", n_refs=5, per_ref=5)


@pytest.fixture(scope="module")
def kadid_zip(kadid_tree) -> bytes:
    return zip_folder(kadid_tree, "kadid10k")


@pytest.fixture
def server():
    loopback = Loopback()
    yield loopback
    loopback.close()


@pytest.fixture
def data_dir(isolated_home) -> Path:
    return isolated_home / "datasets"


def offer_kadid(server: Loopback, monkeypatch, data: bytes, size: int | None = None, sha256: str | None = "auto",
                drops=None, served: bytes | None = None) -> str:
    """Serve ``served`` (default ``data``) as KADID's archive, with the table recording ``data``'s
    size and sha256 (or the given ones): the test's stand-in for the official entry."""
    url = server.serve(KADID_PATH, data if served is None else served, drops)
    sha = hashlib.sha256(data).hexdigest() if sha256 == "auto" else sha256
    archive = Archive("kadid10k.zip", url, len(data) if size is None else size, sha, "dmos.csv")
    monkeypatch.setitem(download.ARCHIVES, "kadid10k", (archive,))
    return url


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_one_line_failure(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    return lines[0]


def test_download_unpacks_checks_and_a_rerun_does_nothing(server, monkeypatch, kadid_zip, data_dir):
    offer_kadid(server, monkeypatch, kadid_zip)
    result = runner.invoke(app, ["data", "download", "kadid", "--workers", "1"])
    assert result.exit_code == 0, result.output
    dest = data_dir / "kadid10k"
    assert (dest / "dmos.csv").is_file() and len(list((dest / "images").iterdir())) == 30
    assert "decoded fine: 25; missing: 0; broken: 0" in result.output and "ok" in result.output
    assert sorted(os.listdir(data_dir)) == ["kadid10k"]  # the .part folder is gone
    assert json.loads((dest / download.MARKER).read_text())["checked"] is True
    requests = len(server.requests)

    again = runner.invoke(app, ["data", "download", "kadid10k"])
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert len(server.requests) == requests
    assert runner.invoke(app, ["data", "check", "kadid", "--workers", "1"]).exit_code == 0


def test_koniq_from_a_mirror_folder_is_verified_by_its_zip_crcs(server, monkeypatch, tmp_path, data_dir):
    # The real table records no size or sha256 for KonIQ: its archives pass on their CRCs alone.
    tree = make_koniq(tmp_path / "koniq", n=12)
    (tmp_path / "scores").mkdir()
    (tree / "koniq10k_scores_and_distributions.csv").rename(tmp_path / "scores" / "koniq10k_scores_and_distributions.csv")
    server.serve("/nas/koniq10k_1024x768.zip", zip_folder(tree, "", extra=[("__MACOSX/._1024x768", b"fork")]))
    server.serve("/nas/koniq10k_scores_and_distributions.zip", zip_folder(tmp_path / "scores", "koniq10k"))
    monkeypatch.setenv("LODA_DATA_URL_KONIQ10K", server.url("/nas"))
    result = runner.invoke(app, ["data", "download", "koniq", "--workers", "1"])
    assert result.exit_code == 0, result.output
    dest = data_dir / "koniq10k"
    assert sorted(p.name for p in dest.iterdir()) == [download.MARKER, "1024x768", "koniq10k_scores_and_distributions.csv"]
    assert "labelled images: 12" in result.output
    assert {p for _, p, _ in server.requests} == {"/nas/koniq10k_1024x768.zip", "/nas/koniq10k_scores_and_distributions.zip"}


def test_a_dropped_connection_resumes_with_range_on_the_rerun(server, monkeypatch, kadid_zip, data_dir):
    half = len(kadid_zip) // 2
    offer_kadid(server, monkeypatch, kadid_zip, drops=[half])
    result = runner.invoke(app, ["data", "download", "kadid", "--retries", "0", "--workers", "1"])
    line = assert_one_line_failure(result)
    assert f"stopped after {half:,} of {len(kadid_zip):,} bytes" in line and "rerun the same command to resume" in line
    part = data_dir / "kadid10k.part" / "kadid10k.zip"
    assert part.read_bytes() == kadid_zip[:half]
    assert not (data_dir / "kadid10k").exists()

    result = runner.invoke(app, ["data", "download", "kadid", "--workers", "1"])
    assert result.exit_code == 0, result.output
    gets = server.gets(KADID_PATH)
    assert "Range" not in gets[0] and gets[1]["Range"] == f"bytes={half}-" and len(gets) == 2
    assert (data_dir / "kadid10k" / "dmos.csv").is_file()


def test_a_transfer_that_stops_is_resumed_within_the_run(server, monkeypatch, kadid_zip, data_dir):
    offer_kadid(server, monkeypatch, kadid_zip, drops=[1000, 5000])
    waits = []
    monkeypatch.setattr(download, "_sleep", waits.append)
    result = runner.invoke(app, ["data", "download", "kadid", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert [h.get("Range") for h in server.gets(KADID_PATH)] == [None, "bytes=1000-", "bytes=6000-"]
    assert waits == [2, 4] and "retry 1 of 3" in result.output


def test_a_flipped_byte_fails_the_sha256_and_leaves_nothing(server, monkeypatch, kadid_zip, data_dir):
    bad = bytearray(kadid_zip)
    bad[len(bad) // 2] ^= 0xFF
    offer_kadid(server, monkeypatch, kadid_zip, served=bytes(bad))
    line = assert_one_line_failure(runner.invoke(app, ["data", "download", "kadid"]))
    assert "kadid10k.zip is damaged: its sha256 is" in line and "rerun to download it again" in line
    assert list(data_dir.iterdir()) == []  # no dataset, no half-unpacked folder, no .part


def test_a_flipped_byte_fails_the_zip_crc_and_leaves_nothing(server, monkeypatch, kadid_tree, data_dir):
    stored = zip_folder(kadid_tree, "kadid10k", compression=zipfile.ZIP_STORED)
    image = (kadid_tree / "images" / "I03_01_02.png").read_bytes()
    at = stored.find(image) + len(image) // 2
    bad = bytearray(stored)
    bad[at] ^= 0xFF
    offer_kadid(server, monkeypatch, bytes(bad), sha256=None)  # no sha256 recorded, as for KonIQ
    line = assert_one_line_failure(runner.invoke(app, ["data", "download", "kadid"]))
    assert "kadid10k.zip is damaged (Bad CRC-32 for file 'kadid10k/images/I03_01_02.png')" in line
    assert list(data_dir.iterdir()) == []


def test_the_wrong_size_is_refused_before_anything_is_written(server, monkeypatch, kadid_zip, data_dir):
    offer_kadid(server, monkeypatch, kadid_zip, size=len(kadid_zip) + 1)
    line = assert_one_line_failure(runner.invoke(app, ["data", "download", "kadid"]))
    assert f"is {len(kadid_zip):,} bytes, but kadid10k.zip is {len(kadid_zip) + 1:,} bytes" in line and "refused" in line
    assert list(data_dir.iterdir()) == []


def _special(name: str, kind: int, target: bytes = b"/etc/passwd") -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (kind | 0o777) << 16
    return info, target


@pytest.mark.parametrize("entry, problem", [
    (("kadid10k/../../evil.txt", b"gotcha"), "a path out of its folder"),
    (("/tmp/loda-evil.txt", b"gotcha"), "an absolute path"),
    (_special("kadid10k/images/I01.png.lnk", stat.S_IFLNK), "a symbolic link"),
    (_special("kadid10k/null", stat.S_IFCHR, b""), "a device or other special file"),
    (("kadid10k/zeros.bin", bytes(20 << 20)), "zip bomb"),
])
def test_unsafe_entries_are_refused_and_nothing_is_written_outside(server, monkeypatch, kadid_tree, data_dir, tmp_path,
                                                                  entry, problem):
    evil = zip_folder(kadid_tree, "kadid10k", extra=[entry])
    offer_kadid(server, monkeypatch, evil)
    before = set(tmp_path.parent.iterdir())
    line = assert_one_line_failure(runner.invoke(app, ["data", "download", "kadid"]))
    assert "holds an unsafe entry" in line and problem in line and "nothing was unpacked" in line
    assert list(data_dir.iterdir()) == []
    assert set(tmp_path.parent.iterdir()) == before and not Path("/tmp/loda-evil.txt").exists()


_LIMITED = """
import json, sys
from loda_cli import download
download.ARCHIVES["kadid10k"] = (download.Archive(*json.loads(sys.argv[1])),)
sys.argv = ["loda"] + sys.argv[2:]
from loda_cli.cli.main import main
main()
"""


def run_with_file_size_limit(limit: int, fields: list, args: list[str]) -> subprocess.CompletedProcess:
    """`loda ARGS` in a process whose files may not grow past ``limit`` bytes (a full disk, as
    RLIMIT_FSIZE makes one), with KADID's table entry replaced by ``fields``."""
    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", _LIMITED, json.dumps(fields), *args], env=env, preexec_fn=limited,
                          capture_output=True, text=True, timeout=300)


def test_a_full_disk_while_downloading_keeps_what_arrived(server, monkeypatch, kadid_zip, data_dir):
    url = offer_kadid(server, monkeypatch, kadid_zip, drops=[len(kadid_zip) // 4])
    runner.invoke(app, ["data", "download", "kadid", "--retries", "0"])  # an earlier, interrupted run
    part = data_dir / "kadid10k.part" / "kadid10k.zip"
    assert part.read_bytes() == kadid_zip[: len(kadid_zip) // 4]

    limit = len(kadid_zip) // 2
    fields = ["kadid10k.zip", url, len(kadid_zip), hashlib.sha256(kadid_zip).hexdigest(), "dmos.csv"]
    done = run_with_file_size_limit(limit, fields, ["data", "download", "kadid"])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "the disk is full (File too large)" in lines[0], done.stderr
    assert kadid_zip.startswith(part.read_bytes()) and part.stat().st_size <= limit
    assert not (data_dir / "kadid10k").exists()

    result = runner.invoke(app, ["data", "download", "kadid", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert server.gets(KADID_PATH)[-1]["Range"].startswith("bytes=")


def test_a_full_disk_while_unpacking_leaves_no_dataset_and_keeps_the_archive(server, monkeypatch, kadid_tree,
                                                                           data_dir):
    rng = random.Random(0)
    words = [f"w{rng.randrange(400)}" for _ in range(150_000)]
    notes = " ".join(words).encode()
    archive = zip_folder(kadid_tree, "kadid10k", extra=[("kadid10k/notes.txt", notes)])
    limit = (len(archive) + len(notes)) // 2
    assert len(archive) < limit < len(notes)
    url = offer_kadid(server, monkeypatch, archive)
    fields = ["kadid10k.zip", url, len(archive), hashlib.sha256(archive).hexdigest(), "dmos.csv"]
    done = run_with_file_size_limit(limit, fields, ["data", "download", "kadid"])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "the disk is full" in lines[0] and "removed what was unpacked" in lines[0]
    part = data_dir / "kadid10k.part"
    assert (part / "kadid10k.zip").read_bytes() == archive
    assert not (data_dir / "kadid10k").exists()
    assert not (part / "staging").exists() and not (part / "unpack").exists()

    gets = len(server.gets(KADID_PATH))
    result = runner.invoke(app, ["data", "download", "kadid", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert len(server.gets(KADID_PATH)) == gets  # unpacked from the kept archive, not fetched again
    assert (data_dir / "kadid10k" / "notes.txt").read_bytes() == notes


def test_not_enough_free_space_is_found_first(server, monkeypatch, kadid_zip, data_dir):
    offer_kadid(server, monkeypatch, kadid_zip)
    usage = type(shutil.disk_usage("/"))
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5000, 5000))
    line = assert_one_line_failure(runner.invoke(app, ["data", "download", "kadid"]))
    assert "not enough free space" in line and "5.0 kB is free" in line
    assert list(data_dir.iterdir()) == []


def test_a_404_and_an_unreachable_host_each_give_one_line(server, monkeypatch, kadid_zip, data_dir):
    archive = Archive("kadid10k.zip", server.url("/gone/kadid10k.zip"), len(kadid_zip), None, "dmos.csv")
    monkeypatch.setitem(download.ARCHIVES, "kadid10k", (archive,))
    line = assert_one_line_failure(runner.invoke(app, ["data", "download", "kadid"]))
    assert "the server answered HTTP 404" in line and "place it by hand: download" in line

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = Archive("kadid10k.zip", f"http://127.0.0.1:{port}/kadid10k.zip", len(kadid_zip), None, "dmos.csv")
    monkeypatch.setitem(download.ARCHIVES, "kadid10k", (closed,))
    line = assert_one_line_failure(runner.invoke(app, ["data", "download", "kadid"]))
    assert line.startswith("error: cannot reach 127.0.0.1 (")
    assert f"unpack it so that {data_dir / 'kadid10k'} holds images/" in line and "loda data check kadid10k" in line
    assert list(data_dir.iterdir()) == []


def test_a_local_mirror_file_and_the_url_option(monkeypatch, kadid_zip, tmp_path, data_dir):
    copy = tmp_path / "nas" / "kadid10k.zip"
    copy.parent.mkdir()
    copy.write_bytes(kadid_zip)
    archive = Archive("kadid10k.zip", "http://127.0.0.1:9/never.zip", len(kadid_zip),
                      hashlib.sha256(kadid_zip).hexdigest(), "dmos.csv")
    monkeypatch.setitem(download.ARCHIVES, "kadid10k", (archive,))
    result = runner.invoke(app, ["data", "download", "kadid", "--url", str(copy.parent), "--workers", "1",
                                 "--data", str(tmp_path / "mine")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mine" / "dmos.csv").is_file() and copy.read_bytes() == kadid_zip


def test_datasets_without_a_direct_download_say_where_and_how(data_dir):
    line = assert_one_line_failure(runner.invoke(app, ["data", "download", "live"]))
    assert "no public direct download" in line and "https://live.ece.utexas.edu" in line and "dmos_realigned.mat" in line
    assert runner.invoke(app, ["data", "download", "csv"]).exit_code == 2
    assert runner.invoke(app, ["data", "download", "nope"]).exit_code == 2


def test_a_users_folder_is_never_touched(server, monkeypatch, kadid_zip, kadid_tree, data_dir):
    offer_kadid(server, monkeypatch, kadid_zip)
    mine = data_dir / "kadid10k"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    line = assert_one_line_failure(runner.invoke(app, ["data", "download", "kadid"]))
    assert "exists but is not a complete KADID-10k" in line and "move it aside" in line
    assert sorted(os.listdir(data_dir)) == ["kadid10k"] and os.listdir(mine) == ["notes.txt"]

    complete = make_kadid(data_dir / "elsewhere", n_refs=2, per_ref=2)
    result = runner.invoke(app, ["data", "download", "kadid", "--data", str(complete)])
    assert result.exit_code == 0 and "not downloaded by loda, so left as it is" in result.output
    assert not server.requests


def test_rar_without_an_extractor_prints_the_manual_steps(server, monkeypatch, tmp_path, data_dir):
    archive = Archive("tid2013.rar", server.url("/tid2013.rar"), None, None, "mos_with_names.txt")
    monkeypatch.setitem(download.ARCHIVES, "tid2013", (archive,))
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    line = assert_one_line_failure(runner.invoke(app, ["data", "download", "tid"]))
    assert "no RAR extractor is on PATH (7z, 7zz, bsdtar, unrar" in line and "place it by hand: download" in line
    assert not server.requests and not data_dir.exists()


_FAKE_BSDTAR = """#!{python}
# Stands in for bsdtar: lists (-tf, -tvf) and extracts (-x -f A -C D) a zip, links included.
import os, stat, sys, zipfile
args = sys.argv[1:]
if args[0] in ("-tf", "-tvf"):
    with zipfile.ZipFile(args[1]) as zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16
            kind = "l" if stat.S_ISLNK(mode) else "d" if info.is_dir() else "-"
            print(f"{{kind}}rw-r--r--  0 0 0 {{info.file_size}} Jan  1  2013 {{info.filename}}" if args[0] == "-tvf"
                  else info.filename)
elif args[0] == "-x":
    folder = args[args.index("-C") + 1]
    with zipfile.ZipFile(args[args.index("-f") + 1]) as zf:
        for info in zf.infolist():
            target = os.path.join(folder, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                os.symlink(zf.read(info).decode(), target)
            elif info.is_dir():
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "wb").write(zf.read(info))
else:
    sys.exit(2)
"""


def test_rar_through_an_extractor_on_path(server, monkeypatch, tmp_path, data_dir):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "bsdtar"
    tool.write_text(_FAKE_BSDTAR.format(python=sys.executable))
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    tree = make_tid2013(tmp_path / "tid2013", n_refs=5, per_ref=2)
    url = server.serve("/tid2013.rar", zip_folder(tree, ""))
    monkeypatch.setitem(download.ARCHIVES, "tid2013", (Archive("tid2013.rar", url, None, None, "mos_with_names.txt"),))
    result = runner.invoke(app, ["data", "download", "tid", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "unpacking tid2013.rar with bsdtar" in result.output and "labelled images: 10" in result.output

    linked = zip_folder(tree, "", extra=[_special("Distorted_images/x.bmp", stat.S_IFLNK)])
    server.serve("/linked.rar", linked)
    result = runner.invoke(app, ["data", "download", "tid", "--url", server.url("/linked.rar"),
                                 "--data", str(tmp_path / "second")])
    line = assert_one_line_failure(result)
    assert "'Distorted_images/x.bmp' (a link)" in line
    assert not (tmp_path / "second").exists() and not (tmp_path / "second.part").exists()


def test_a_tree_with_links_or_devices_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x")
    assert unpack.tree_problem(tmp_path) is None
    os.symlink("/etc", tmp_path / "a" / "out")
    assert unpack.tree_problem(tmp_path) == "a/out: a symbolic link"
    os.unlink(tmp_path / "a" / "out")
    os.link(tmp_path / "a" / "f", tmp_path / "g")
    assert unpack.tree_problem(tmp_path).endswith(": a hard link")
    os.unlink(tmp_path / "g")
    os.mkfifo(tmp_path / "pipe")
    assert unpack.tree_problem(tmp_path) == "pipe: a device or other special file"


def test_names_that_leave_their_folder_are_unsafe():
    for name in ("../a", "a/../../b", "/etc/passwd", "C:/x", "a\\..\\b", "a//b", "./a"):
        assert unpack.name_problem(name), name
    for name in ("kadid10k/", "kadid10k/images/I01.png", "a..b/c"):
        assert unpack.name_problem(name) is None, name


# --- loda train --download ---------------------------------------------------------------------


def test_train_download_goes_from_nothing_to_a_checkpoint_that_score_uses(server, monkeypatch, kadid_zip,
                                                                           isolated_home, data_dir, tmp_path):
    offer_kadid(server, monkeypatch, kadid_zip)
    result = runner.invoke(app, ["train", "kadid", "--download", "--max-steps", "2", "--batch-size", "8", *TINY_TRAIN])
    assert result.exit_code == 0, result.output
    checkpoint = isolated_home / "checkpoints" / "loda-kadid10k-split0.safetensors"
    assert checkpoint.is_file() and f"checkpoint: {checkpoint}" in result.output
    assert "ok" in result.output.splitlines()  # the download's data check passed first

    scores = tmp_path / "scores.json"
    score = ["score", str(data_dir / "kadid10k" / "images"), "--out", str(scores), "--crops", "1",
             "--precision", "fp32"]
    # A two-step run on random backbones tests below the built-in model: never the default, and said.
    result = runner.invoke(app, score)
    assert result.exit_code == 0, result.output
    assert json.loads(scores.read_text())["header"]["model"] == "loda-builtin"
    assert "not used by default" in result.output and "loda-kadid10k-split0 (test SRCC" in result.output
    # A real run tests above it (KADID-10k: 0.93 in the paper): then `loda score` takes it, no step between.
    monkeypatch.setattr("loda_cli.weights.builtin_srcc", lambda entries: -1.0)
    result = runner.invoke(app, [*score, "-q"])
    assert result.exit_code == 0, result.output
    document = json.loads(scores.read_text())
    assert document["header"]["model"] == "loda-kadid10k-split0" and len(document["rows"]) == 30


def test_train_without_download_says_how_to_get_the_dataset(server, monkeypatch, kadid_zip, data_dir):
    offer_kadid(server, monkeypatch, kadid_zip)
    line = assert_one_line_failure(runner.invoke(app, ["train", "kadid", *TINY_TRAIN]))
    assert "KADID-10k not found" in line and "loda data download kadid10k" in line and "--download" in line
    monkeypatch.setattr("loda_cli.cli.train._stdin_is_terminal", lambda: True)
    result = runner.invoke(app, ["train", "kadid", *TINY_TRAIN], input="n\n")
    assert "Download it now (" in result.output and result.exit_code == 1
    assert not server.requests and not data_dir.exists()


def test_the_cpu_warning_comes_before_the_download(server, monkeypatch, kadid_zip, data_dir):
    # The paper's model on a CPU: the estimate and the advice are printed before anything is fetched.
    archive = Archive("kadid10k.zip", server.url("/gone/kadid10k.zip"), len(kadid_zip), None, "dmos.csv")
    monkeypatch.setitem(download.ARCHIVES, "kadid10k", (archive,))
    result = runner.invoke(app, ["train", "kadid", "--download", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("estimated time on this CPU: about ") and "days" in lines[0]
    assert lines[1].startswith("warning: the paper's model (ViT-B/16 + ResNet-50) trains on a CPU for about ")
    assert "HTTP 404" in error_lines(result.output)[0]


def test_the_time_estimates(tmp_path):
    from loda_cli import train_estimate as te

    kadid = te.workload(10125, 3, 10, 128)
    assert kadid.steps == 1890 and kadid.train_crops == 1890 * 128
    assert te.preflight("kadid10k", 10125, kadid, True, "cuda", 16, "NVIDIA H100 80GB HBM3")[0].startswith(
        "estimated time on this GPU (NVIDIA H100 80GB HBM3): about 5 min for 1,890 steps on 10,125 kadid10k images")
    cpu = te.preflight("kadid10k", 10125, kadid, True, "cpu", 2)
    assert "about 5.0 days" in cpu[0] and cpu[1].startswith("warning: the paper's model")
    assert "--device cuda" in cpu[1] and te.SMALLER_MODEL in cpu[1]
    assert te.preflight("kadid10k", 10125, kadid, False, "cpu", 2) == []  # other models: timed on the spot

    # The on-the-spot figure: after 10 timed steps the rest of the run is projected.
    root = make_kadid(tmp_path / "kadid", n_refs=5, per_ref=5)
    result = runner.invoke(app, ["train", "kadid", "--data", str(root), "--max-steps", "12", "--batch-size", "4",
                                 "--out", str(tmp_path / "m.safetensors"), *TINY_TRAIN])
    assert result.exit_code == 0, result.output
    assert "measured over 10 steps:" in result.output and "the remaining 1 step and 1 evaluation need" in result.output


def test_backbone_weights_come_through_the_hub_cache_with_progress(server, monkeypatch, tmp_path):
    import huggingface_hub.constants

    from loda_cli import backbones

    repo = "timm/test_vit.r160_in1k"
    assert backbones.hub_repo("test_vit") == (repo, None)
    payload = bytes(range(256)) * 300
    path = f"/{repo}/resolve/main/model.safetensors"
    server.serve(path, payload)
    server.extra_headers[path] = {"X-Repo-Commit": "1" * 40}
    monkeypatch.setenv("HF_ENDPOINT", server.url(""))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub reads its cache folder once, at import: this test's fake weights go to a
    # folder of its own, never where later tests look for real (missing) ones.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert backbones.missing(["test_vit"]) == [("test_vit", repo, None)]
    events = []
    assert backbones.fetch(["test_vit"], lambda kind, data: events.append((kind, data))) == ["test_vit"]
    assert events[0][0] == "download" and events[0][1]["total"] == len(payload)
    assert events[-1] == ("bytes", {"done": len(payload), "total": len(payload)})
    assert backbones.missing(["test_vit"]) == []
    assert backbones.fetch(["test_vit"], lambda kind, data: events.append(kind)) == []  # cached: nothing to do
