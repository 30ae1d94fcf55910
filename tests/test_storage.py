"""layerloop/storage.py against a real S3 API: moto's server on 127.0.0.1 (a free port), started and stopped
by the session fixture ``s3``, with fake credentials in the environment. Nothing here contacts any other
address: the instance-metadata lookup is disabled and no profile file is read."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid

import pytest

from layerloop import storage

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "layerloop-test-key",
    "AWS_SECRET_ACCESS_KEY": "layerloop-test-secret-never-printed",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
}
SECRET = FAKE_ENV["AWS_SECRET_ACCESS_KEY"]


class S3Server:
    """moto's standalone S3 server on 127.0.0.1 (its own thread), and the environment pointing at it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()
        assert self.host == "127.0.0.1"
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**FAKE_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def bucket(self) -> str:
        """A fresh bucket."""
        import boto3

        name = f"ll-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return name

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def stop(self) -> None:
        self.server.stop()


try:  # imported at collection, while pytest runs no other thread: a CI run once failed inside werkzeug's import
    import moto.server  # noqa: F401  (its module-level loop over globals()) when the fixture imported it mid-session
except ImportError:  # the fixture skips
    pass


@pytest.fixture(scope="session")
def s3():
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        server = S3Server()
        for name, value in server.env.items():
            patch.setenv(name, value)
        storage._FILESYSTEMS.clear()
        try:
            yield server
        finally:
            server.stop()
            storage._FILESYSTEMS.clear()


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server, to drop the connection and bring it back on the
    same port (the server and its objects stay up)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.listener.close()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self.up()

    def up(self) -> None:
        self._stop.clear()
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self.listener.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def down(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.listener.close()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._sockets.clear()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass


# ============================================================================= unit tests
def test_plain_paths_stay_paths_and_urls_are_redacted():
    from pathlib import Path

    assert storage.location("runs/x") == Path("runs/x")
    assert storage.location("file:///tmp/x") == Path("/tmp/x")
    assert isinstance(storage.location("s3://b/p/"), storage.StorePath)
    assert storage.location("s3://b/p/").url == "s3://b/p"
    assert storage.redact("s3://KEY:SECRET@bucket/p/x.tar?X-Amz-Signature=abc") == "s3://bucket/p/x.tar"
    assert storage.redact("/local/path") == "/local/path"
    path = storage.StorePath("s3://b/p") / "demo-000001.tar"
    assert (path.name, path.stem, path.suffix) == ("demo-000001.tar", "demo-000001", ".tar")
    assert path.with_suffix(".parquet").url == "s3://b/p/demo-000001.parquet"
    assert path.parent.url == "s3://b/p"
    with pytest.raises(TypeError):
        os.fspath(path)  # never handed to open() or os.replace by mistake


def test_store_path_reads_writes_lists_and_removes(s3):
    root = storage.location(f"s3://{s3.bucket()}/run")
    root.mkdir()
    assert not root.is_dir()
    (root / "a.bin").write_bytes(b"x" * 10)
    (root / "b.txt").write_text("hello")
    assert root.is_dir() and (root / "a.bin").exists() and not (root / "zz").exists()
    assert [p.name for p in root.glob("*.bin")] == ["a.bin"]
    assert (root / "a.bin").stat().st_size == 10 and (root / "b.txt").read_text() == "hello"
    assert (root / "a.bin").read_range(2, 5) == b"xxx"
    (root / "a.bin").unlink()
    (root / "a.bin").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (root / "a.bin").read_bytes()
    assert [p.name for p in root.iterdir()] == ["b.txt"]


def test_conditional_create_is_exclusive(s3):
    path = storage.location(f"s3://{s3.bucket()}/obj")
    etag = path.create_exclusive(b"1")
    assert etag
    with pytest.raises(FileExistsError):
        path.create_exclusive(b"2")
    with pytest.raises(FileExistsError):
        path.replace_if_match(b"3", '"not-the-etag"')
    assert path.replace_if_match(b"4", etag) and path.read_bytes() == b"4"


def test_lease_refuses_a_second_writer_with_the_holder_and_allows_takeover_when_expired(s3):
    prefix = storage.location(f"s3://{s3.bucket()}/run")
    first = storage.Lease(prefix / storage.LEASE_NAME, ttl=30).acquire()
    try:
        with pytest.raises(storage.LeaseHeld, match=rf"in use by another layerloop run \(pid {os.getpid()} on"):
            storage.Lease(prefix / storage.LEASE_NAME, ttl=30).acquire()
    finally:
        first.release()
    assert not (prefix / storage.LEASE_NAME).exists()  # released: removed
    # A driver that died: its lease is left with an expiry in the past; the next writer takes it over.
    stale = {"holder": "pid 1 on gone-host since then", "token": "dead", "expires": time.time() - 1, "ttl": 1}
    (prefix / storage.LEASE_NAME).write_bytes(json.dumps(stale).encode())
    second = storage.Lease(prefix / storage.LEASE_NAME, ttl=30).acquire()
    try:
        assert storage.read_lease(prefix / storage.LEASE_NAME).token == second.token
    finally:
        second.release()


def test_lease_heartbeat_renews_and_notices_a_takeover(s3):
    path = storage.location(f"s3://{s3.bucket()}/run") / storage.LEASE_NAME
    lease = storage.Lease(path, ttl=1.2).acquire()
    try:
        first = storage.read_lease(path).expires
        time.sleep(1.0)
        renewed = storage.read_lease(path)
        assert renewed.token == lease.token and renewed.expires > first and not renewed.expired
        path.write_bytes(json.dumps({"holder": "another", "token": "other", "expires": time.time() + 60}).encode())
        deadline = time.time() + 5
        while not lease.lost and time.time() < deadline:
            time.sleep(0.05)
        assert lease.lost
    finally:
        lease.release()
    assert storage.read_lease(path).token == "other"  # a lost lease is not deleted


def test_missing_bucket_and_missing_credentials_are_one_line(s3, monkeypatch):
    with pytest.raises(storage.StoreError) as raised:
        storage.check_bucket(storage.location("s3://no-such-bucket-ll/run"))
    assert raised.value.errno == errno.ENOENT and "no-such-bucket-ll does not exist" in str(raised.value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    storage._FILESYSTEMS.clear()
    try:
        with pytest.raises(storage.StoreError) as raised:
            storage.check_bucket(storage.location(f"s3://{s3.bucket()}/run"))
        assert raised.value.errno == errno.ENOKEY and "no credentials found" in str(raised.value)
    finally:
        storage._FILESYSTEMS.clear()


def test_mirror_copies_once_and_again_only_what_changed(s3, tmp_path, monkeypatch):
    root = storage.location(f"s3://{s3.bucket()}/data")
    (root / "a.parquet").write_bytes(b"a" * 10)
    (root / "sub" / "b.arrow").write_bytes(b"b" * 20)
    objects = [root / "a.parquet", root / "sub" / "b.arrow"]
    target = storage.mirror(objects, root, tmp_path / "copy")
    assert (target / "a.parquet").read_bytes() == b"a" * 10 and (target / "sub" / "b.arrow").read_bytes() == b"b" * 20
    fetched = []
    real_open = storage.StorePath.open
    monkeypatch.setattr(storage.StorePath, "open", lambda self, *a, **k: fetched.append(self.name) or real_open(self, *a, **k))
    storage.mirror(objects, root, tmp_path / "copy")
    assert fetched == []  # size and ETag unchanged: nothing is fetched again
    (root / "sub" / "b.arrow").write_bytes(b"c" * 20)  # same size, new content (a new ETag)
    storage.mirror(objects, root, tmp_path / "copy")
    assert fetched == ["b.arrow"] and (target / "sub" / "b.arrow").read_bytes() == b"c" * 20
    assert not [p for p in target.rglob("*") if ".tmp-" in p.name]
    with pytest.raises(ValueError, match="is not below"):
        storage.mirror([storage.location(f"s3://{root.bucket}/elsewhere")], root, tmp_path / "copy")


def test_records_name_staged_paths_by_url_and_each_node_reads_them_as_its_own(s3, tmp_path, monkeypatch):
    """``canonical`` / ``localize`` / ``reference`` / ``fingerprint_of``: a path inside a staging folder is
    recorded as its store URL, and read back in another node's copy (another staging base) as that copy's
    path; a checkpoint folder named by URL is loaded from the copy, or mirrored into the cache elsewhere."""
    from layerloop.config import fingerprint_of

    url = f"s3://{s3.bucket()}/loop"
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "a"))
    other = {"source": "/data/elsewhere", "model": "tiny"}
    with storage.Staged(url, interval=0) as here:
        (here / "train" / "final").mkdir(parents=True)
        (here / "train" / "final" / "w.bin").write_bytes(b"w" * 4)
        record = {"run_dir": str(here / "data" / "base"), "runs": [str(here)], **other}
        stored = storage.canonical(record)
        assert stored == {"run_dir": f"{url}/data/base", "runs": [url], **other}
        assert storage.localize(stored) == record
        assert storage.reference(here / "train" / "final") == f"{url}/train/final"
        assert storage.reference("s3://b/x") == "s3://b/x"
        assert storage.local_folder(f"{url}/train/final") == here / "train" / "final"  # no download
        fingerprint = fingerprint_of(record)
        monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "b"))  # another node
        with storage.Staged(url, lease=False, writer=False) as there:
            assert there != here and storage.localize(stored) == {
                "run_dir": str(there / "data" / "base"), "runs": [str(there)], **other}
            assert fingerprint_of({**record, "run_dir": str(there / "data" / "base"), "runs": [str(there)]}) == \
                fingerprint
    assert fingerprint_of(record) != fingerprint  # no staging folder open: paths are paths
    copy = storage.local_folder(f"{url}/train/final")  # nothing staged here: a cached mirror
    assert copy.is_relative_to(tmp_path / "cache") and (copy / "w.bin").read_bytes() == b"w" * 4
    with pytest.raises(FileNotFoundError, match="holds no files"):
        storage.local_folder(f"{url}/missing")


def test_a_writer_never_removes_objects_another_writer_put_under_its_prefix(s3, tmp_path, monkeypatch):
    """A build inside a staged folder writes its shards straight to the store: the folder's syncs must not
    take them for files deleted locally."""
    url = f"s3://{s3.bucket()}/loop"
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    with storage.Staged(url, interval=0) as local:
        (local / "gone.txt").write_text("uploaded, then deleted locally")
        staged = storage.staging_of(local)[0]
        staged.push()
        storage.location(f"{url}/build/shard-000000.tar").write_bytes(b"tar")  # another writer's object
        (local / "gone.txt").unlink()
        staged.push()
        assert storage.location(f"{url}/build/shard-000000.tar").exists()
        assert not storage.location(f"{url}/gone.txt").exists()
        assert staged.pull() == 1 and (local / "build" / "shard-000000.tar").read_bytes() == b"tar"


def test_handoff_gives_the_prefix_to_node_copies_and_takes_back_what_they_wrote(s3, tmp_path, monkeypatch):
    """A command's staging folder handed to work on another node (its own staging base): the node copy is
    made equal to the store (a stale file it held is removed, one of the same size but other bytes fetched
    again), only a writer copy uploads, and afterwards the command's folder is the store again."""
    url = f"s3://{s3.bucket()}/run"
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "driver"))
    with storage.Staged(url, interval=0) as local:
        (local / "keep.txt").write_text("kept")
        (local / "old.txt").write_text("old")
        (local / "ckpt").mkdir()
        (local / "ckpt" / "w.bin").write_bytes(b"1" * 8)
        staged, relative = storage.staging_of(local / "ckpt" / "w.bin")
        assert relative == "ckpt/w.bin" and staged.remote.url == url
        with staged.handoff() as handed:
            assert handed == url and sorted(s3.keys(url[5:].split("/")[0], "run/")) == \
                ["run/ckpt/w.bin", "run/keep.txt", "run/old.txt", "run/run.lease"]
            monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "node"))  # another node's disk
            node = storage.staging_dir(url)
            (node / "ckpt").mkdir(parents=True)
            (node / "stale.txt").write_text("from an earlier run")
            (node / "ckpt" / "w.bin").write_bytes(b"0" * 8)  # same size, other bytes
            with storage.Staged(url, lease=False, writer=False) as reader:
                assert reader == node and (node / "ckpt" / "w.bin").read_bytes() == b"1" * 8
                assert not (node / "stale.txt").exists() and (node / "old.txt").read_text() == "old"
                (node / "not-uploaded.txt").write_text("a reader's file")
            with storage.Staged(url, lease=False) as writer:  # rank 0: writes, removes, uploads on exit
                assert not (writer / "not-uploaded.txt").exists()
                (writer / "old.txt").unlink()
                (writer / "ckpt" / "w.bin").write_bytes(b"2" * 8)
                (writer / "new.txt").write_text("new")
                (writer / "ckpt.tmp-1").mkdir()  # a checkpoint being written: not uploaded
                (writer / "ckpt.tmp-1" / "part.bin").write_bytes(b"3")
            monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "driver"))
        assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == \
            ["ckpt/w.bin", "keep.txt", "new.txt"]
        assert (local / "ckpt" / "w.bin").read_bytes() == b"2" * 8 and (local / "new.txt").read_text() == "new"
    assert storage.staging_of(local) is None  # closed
    assert storage.location(f"{url}/ckpt/w.bin").read_bytes() == b"2" * 8
    assert not storage.location(f"{url}/old.txt").exists()
    assert not storage.location(f"{url}/ckpt.tmp-1/part.bin").exists()


def test_rebase_moves_paths_in_a_folder_and_nothing_else():
    data = {"out": "/a/stage/x", "runs": ["/a/stage", "/a/stage/y/z", "/a/stager", "s3://b/a/stage"], "n": 3}
    assert storage.rebase(data, "/a/stage", "/node/s") == {
        "out": "/node/s/x", "runs": ["/node/s", "/node/s/y/z", "/a/stager", "s3://b/a/stage"], "n": 3}
    assert storage.rebase(data, "/a/stage", "/a/stage") is data


def test_push_uploads_in_the_order_the_files_were_written(s3, tmp_path, monkeypatch):
    """A checkpoint's trainer.pt (its commit mark, written last) and a metrics line written before it: an
    upload cut short never leaves a mark on the store without what it marks."""
    import os

    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    with storage.Staged(f"s3://{s3.bucket()}/run", interval=0) as local:
        written = ["metrics.jsonl", "ckpt/weights/w.json", "ckpt/weights/w.safetensors", "ckpt/trainer.pt",
                   "index.parquet", "shard.tar"]
        for i, name in enumerate(written):
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_text(name)
            os.utime(local / name, ns=(10**18 + i, 10**18 + i))
        (local / "late.json").write_text("same time as the tar: after it")
        os.utime(local / "late.json", ns=(10**18 + 5, 10**18 + 5))
        uploaded = []
        real = storage.StorePath.put_file
        monkeypatch.setattr(storage.StorePath, "put_file",
                            lambda self, path: uploaded.append(path.relative_to(local).as_posix()) or real(self, path))
    assert uploaded == written + ["late.json"]
