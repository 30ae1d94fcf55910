"""Google Cloud Storage through gcsfs, against ``gcp-storage-emulator`` (the GCS JSON API served on 127.0.0.1
by this module): a build to ``gs://`` equals a local build byte for byte and resumes, ``inspect`` and the
readers take it, a staged folder syncs through it, the lease of a run prefix refuses a second writer, and
a missing bucket is one line.

The emulator ignores GCS preconditions (``ifGenerationMatch=0``, which gcsfs sends for ``mode="create"``);
the fixture makes it answer 412 as GCS does when the object exists, so that the lease's conditional create
is exercised end to end through the real client."""

from __future__ import annotations

import importlib.util
import logging
import socket
import uuid
from http import HTTPStatus
from pathlib import Path

import pytest

from layerloop import storage
from layerloop.config import load_config
from layerloop.pipelines.build import build

pytest.importorskip("gcp_storage_emulator")
if importlib.util.find_spec("gcsfs") is None:
    pytest.skip("gcsfs is not installed", allow_module_level=True)


def _honour_create_preconditions() -> None:
    """Make the emulator's uploads refuse ``ifGenerationMatch=0`` on an existing object (HTTP 412), as GCS
    does; it otherwise overwrites."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.insert, "layerloop_preconditions", False):
        return
    insert = objects.insert

    def checked(request, response, store, *args, **kwargs):
        if (request.query.get("ifGenerationMatch") or [None])[0] == "0":
            name = (request.query.get("name") or [None])[0]
            if name is None and isinstance(request.data, dict):
                name = (request.data.get("meta") or {}).get("name")
            try:
                store.get_file_obj(request.params["bucket_name"], name)
            except NotFound:
                pass
            else:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified "
                                                                 "did not hold."}})
                return None
        return insert(request, response, store, *args, **kwargs)

    checked.layerloop_preconditions = True
    objects.insert = checked
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is insert:
                handlers[method] = checked


class GCSServer:
    """gcp-storage-emulator on 127.0.0.1 (its own thread, in memory)."""

    def __init__(self) -> None:
        from gcp_storage_emulator.server import create_server

        for name in ("gcp_storage_emulator", "gcp_storage_emulator.server"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        _honour_create_preconditions()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = create_server("127.0.0.1", self.port, in_memory=True)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # The emulator's endpoint, anonymous credentials (fsspec's FSSPEC_GS_TOKEN), no metadata-server probe,
        # and gcsfs's plain file system (its bucket-type lookup would call a gRPC API the emulator lacks).
        self.env = {"STORAGE_EMULATOR_HOST": self.endpoint, "FSSPEC_GS_TOKEN": "anon", "NO_GCE_CHECK": "true",
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def bucket(self) -> str:
        name = f"ll-{uuid.uuid4().hex[:12]}"
        storage.filesystem("gs").mkdir(name)
        return name

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def gcs():
    with pytest.MonkeyPatch.context() as patch:
        server = GCSServer()
        for name, value in server.env.items():
            patch.setenv(name, value)
        patch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        storage._FILESYSTEMS.clear()
        try:
            yield server
        finally:
            storage._FILESYSTEMS.clear()
            server.stop()


@pytest.fixture(autouse=True)
def local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from layerloop.datasets.demo_scenes import generate_demo_data

    return generate_demo_data(tmp_path_factory.mktemp("gcs-scenes") / "scenes", 8, seed=0, size=64)


def demo_config(scenes: Path):
    return load_config("demo", ["source.n=8", "source.size=64", "stages.load.short_side=64", "executor=local",
                                f"source.path={scenes}", "shards.samples_per_shard=4"])


def test_build_to_gcs_equals_a_local_build_resumes_and_reads_back(gcs, scenes, tmp_path, capsys):
    from layerloop.cli import main
    from layerloop.datasets.shards import read_samples

    local = tmp_path / "local"
    build(demo_config(scenes), out=local, progress=False)
    url = f"gs://{gcs.bucket()}/runs/demo"
    first = build(demo_config(scenes), out=url, progress=False)
    fs = storage.filesystem("gs")
    committed = sorted(p.name for p in local.iterdir() if p.suffix in (".tar", ".parquet"))
    assert first.ok == 8 and len(committed) == 5  # 2 shards + indexes, failures.parquet
    for name in committed:
        assert fs.cat_file(f"{url[5:]}/{name}") == (local / name).read_bytes(), name
    stored = {Path(n).name for n in fs.find(url[5:])}
    assert "run.json" in stored and storage.LEASE_NAME not in stored and not [n for n in stored if ".tmp-" in n]
    again = build(demo_config(scenes), out=url, progress=False)  # resume: everything committed is skipped
    assert again.ok == 8 and again.shards_skipped == 2
    ours = {s.key: s.composite.tobytes() for s in read_samples(url)}
    theirs = {s.key: s.composite.tobytes() for s in read_samples(local)}
    assert ours == theirs and len(ours) == 8
    assert main(["inspect", url]) == 0
    out = capsys.readouterr().out
    assert f"at {url}" in out and "8 ok, 0 failed" in out


def test_lease_on_gcs_refuses_a_second_writer_and_a_missing_bucket_is_one_line(gcs, scenes, capsys):
    from layerloop.cli import main

    prefix = storage.location(f"gs://{gcs.bucket()}/runs/held")
    lease = storage.Lease(prefix / storage.LEASE_NAME).acquire()
    try:
        assert lease.conditional  # the create was conditional (ifGenerationMatch=0)
        with pytest.raises(storage.LeaseHeld, match=r"in use by another layerloop run \(pid \d+ on "):
            storage.Lease(prefix / storage.LEASE_NAME).acquire()
    finally:
        lease.release()
    assert not (prefix / storage.LEASE_NAME).exists()
    code = main(["build", "demo", "source.n=8", "source.size=64", f"source.path={scenes}",
                 "--out", "gs://no-such-bucket-layerloop/x"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("layerloop")]  # not the emulator's
    assert code == 4 and len(err) == 1 and "bucket no-such-bucket-layerloop does not exist" in err[0], err


def test_a_staged_folder_syncs_through_gcs_and_another_machine_resumes_from_it(gcs, tmp_path, monkeypatch):
    url = f"gs://{gcs.bucket()}/train"
    with storage.Staged(url, interval=0) as local:
        (local / "checkpoints" / "step-000002").mkdir(parents=True)
        (local / "checkpoints" / "step-000002" / "weights.bin").write_bytes(b"w" * 64)
        (local / "metrics.jsonl").write_text('{"step": 2}\n')
    assert storage.location(f"{url}/metrics.jsonl").read_text() == '{"step": 2}\n'
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "other-machine"))
    with storage.Staged(url, interval=0) as elsewhere:
        assert elsewhere != local
        assert (elsewhere / "checkpoints" / "step-000002" / "weights.bin").read_bytes() == b"w" * 64
        (elsewhere / "metrics.jsonl").write_text('{"step": 2}\n{"step": 4}\n')
        (elsewhere / "checkpoints" / "step-000002" / "weights.bin").unlink()
    assert storage.location(f"{url}/metrics.jsonl").read_text().count("step") == 2
    assert not storage.location(f"{url}/checkpoints/step-000002/weights.bin").exists()
