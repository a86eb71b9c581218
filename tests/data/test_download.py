"""The downloader against a real HTTP server on 127.0.0.1: good, corrupt and dropped files."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from distlearn.data.download import RemoteFile, download
from distlearn.errors import DataError

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes


class Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):  # noqa: N802
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        if self.path == "/good.bin":
            body = PAYLOAD
        elif self.path == "/corrupt.bin":
            body = PAYLOAD[:-1] + b"\x00"  # one byte differs
        elif self.path == "/drops.bin":  # announces the full length, sends half, closes
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    Handler.hits = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_good_file_is_verified_and_renamed_atomically(server, tmp_path):
    path = download(RemoteFile("data.bin", (f"{server}/good.bin",), sha256=SHA), tmp_path, progress=False)
    assert path == tmp_path / "data.bin" and path.read_bytes() == PAYLOAD
    assert not list(tmp_path.glob("*.part"))
    # a second call finds the verified file and does not fetch again
    download(RemoteFile("data.bin", (f"{server}/good.bin",), sha256=SHA), tmp_path, progress=False)
    assert Handler.hits["/good.bin"] == 1


def test_md5_is_accepted_where_no_sha256_is_published(server, tmp_path):
    md5 = hashlib.md5(PAYLOAD).hexdigest()  # noqa: S324 - the publisher's checksum, not security
    assert download(RemoteFile("m.bin", (f"{server}/good.bin",), md5=md5), tmp_path, progress=False).is_file()


def test_checksum_mismatch_fails_once_without_retry_or_partial_file(server, tmp_path):
    remote = RemoteFile("data.bin", (f"{server}/corrupt.bin",), sha256=SHA)
    with pytest.raises(DataError, match=r"sha256 is [0-9a-f]{64}, expected .*Not retrying"):
        download(remote, tmp_path, retries=3, backoff_s=0.01, progress=False)
    assert Handler.hits["/corrupt.bin"] == 1  # never a re-download loop
    assert list(tmp_path.iterdir()) == []


def test_a_dropped_connection_is_retried_then_reported(server, tmp_path):
    remote = RemoteFile("data.bin", (f"{server}/drops.bin",), sha256=SHA)
    with pytest.raises(DataError, match=r"could not download data.bin .*Without network"):
        download(remote, tmp_path, retries=2, backoff_s=0.01, progress=False)
    assert Handler.hits["/drops.bin"] == 3  # first try + 2 retries
    assert list(tmp_path.iterdir()) == []


def test_the_next_mirror_is_tried_after_a_failing_one(server, tmp_path):
    remote = RemoteFile("data.bin", (f"{server}/missing.bin", f"{server}/good.bin"), sha256=SHA)
    assert download(remote, tmp_path, retries=1, backoff_s=0.01, progress=False).read_bytes() == PAYLOAD
    assert Handler.hits["/missing.bin"] == 2


def test_an_existing_damaged_file_is_reported_not_overwritten(server, tmp_path):
    (tmp_path / "data.bin").write_bytes(b"junk")
    with pytest.raises(DataError, match="exists but its sha256 does not match"):
        download(RemoteFile("data.bin", (f"{server}/good.bin",), sha256=SHA), tmp_path, progress=False)
    assert Path(tmp_path / "data.bin").read_bytes() == b"junk"


def test_no_network_names_what_to_do(tmp_path):
    remote = RemoteFile("data.bin", ("http://127.0.0.1:9/nothing",), sha256=SHA)  # port 9: nothing listens
    with pytest.raises(DataError, match="DISTLEARN_DATA"):
        download(remote, tmp_path, retries=0, timeout_s=2, progress=False)
