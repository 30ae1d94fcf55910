"""Builds, resumes, readers and the training stream against a real S3 API (moto's server on 127.0.0.1,
the ``s3`` fixture of tests/test_storage.py): the bytes equal a local build's, a killed build resumes,
a second writer is refused with the holder, and store errors are one line that loses nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerloop import storage
from layerloop.config import load_config
from layerloop.pipelines.build import build
from tests import test_storage as shared
from tests.test_storage import SECRET, Proxy

s3 = shared.s3  # the session fixture: moto's S3 server on 127.0.0.1

SMALL = ["source.n=8", "source.size=64", "stages.load.short_side=64", "shards.samples_per_shard=2",
         "report.rows=4"]


@pytest.fixture(autouse=True)
def local_cache(tmp_path, monkeypatch):
    """Local copies and logs of store runs go under the test's folder, not ~/.cache."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "layerloop-cache"))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from layerloop.datasets.demo_scenes import generate_demo_data

    out = tmp_path_factory.mktemp("demo") / "scenes"
    generate_demo_data(out, n=8, seed=0, size=64)
    return out


def overrides(demo_data: Path, *more: str) -> list[str]:
    return [*SMALL, f"source.path={demo_data}", *more]


def local_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())
            if p.name.startswith("demo-") or p.name == "failures.parquet"}


def store_bytes(s3, url: str) -> dict[str, bytes]:
    bucket, prefix = url[len("s3://"):].split("/", 1)
    client = s3.client()
    out = {}
    for key in s3.keys(bucket, prefix + "/"):
        name = key[len(prefix) + 1:]
        if name.startswith("demo-") or name == "failures.parquet":
            out[name] = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return out


@pytest.fixture(scope="module")
def local_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    build(load_config("demo", overrides(demo_data, "executor=local")), out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def s3_run(s3, demo_data):
    url = f"s3://{s3.bucket()}/runs/demo"
    result = build(load_config("demo", overrides(demo_data, "executor=local")), out=url, progress=False)
    return url, result


def test_build_to_s3_equals_a_local_build_byte_for_byte(s3, s3_run, local_run):
    url, result = s3_run
    assert result.shards_total == 4 and result.shards_built == 4
    want = local_bytes(local_run)
    assert len(want) == 9  # 4 tars, 4 indexes, failures.parquet
    assert store_bytes(s3, url) == want
    bucket, prefix = url[len("s3://"):].split("/", 1)
    keys = s3.keys(bucket, prefix + "/")
    assert f"{prefix}/run.json" in keys and f"{prefix}/run.lease" not in keys  # the lease is released
    assert not [k for k in keys if ".tmp-" in k]
    info = storage.location(url) / "run.json"
    assert SECRET not in info.read_text() and '"status": "complete"' in info.read_text()


def test_resume_on_s3_skips_committed_shards_and_removes_abandoned_objects(s3, s3_run, demo_data):
    url, _ = s3_run
    root = storage.location(url)
    before = store_bytes(s3, url)
    (root / "demo-000007.tar").write_bytes(b"abandoned: no index commits it")  # a writer stopped between PUTs
    (root / "demo-000001.tar.tmp-deadbeef").write_bytes(b"left over")
    bucket, prefix = url[len("s3://"):].split("/", 1)
    s3.client().create_multipart_upload(Bucket=bucket, Key=f"{prefix}/demo-000003.tar")  # a killed big upload
    again = build(load_config("demo", overrides(demo_data, "executor=local")), out=url, progress=False)
    assert again.shards_skipped == 4 and again.shards_built == 0
    assert store_bytes(s3, url) == before  # the abandoned objects are gone, nothing else changed
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_damaged_shard_on_s3_is_rebuilt_and_named_by_inspect(s3, demo_data, local_run):
    from layerloop.report import inspect_run

    url = f"s3://{s3.bucket()}/damaged"
    config = load_config("demo", overrides(demo_data, "executor=local"))
    build(config, out=url, progress=False)
    root = storage.location(url)
    (root / "demo-000002.tar").write_bytes(b"x" * 100)
    text = inspect_run(url)
    assert "damaged:     1 shard(s)" in text and "demo-000002" in text and "tar is 100 bytes" in text
    result = build(config, out=url, progress=False)
    assert result.shards_built == 1 and "demo-000002 rebuilt" in result.summary()
    assert store_bytes(s3, url) == local_bytes(local_run)


def test_inspect_and_read_samples_from_s3(s3, s3_run, local_run, capsys):
    from layerloop.cli import main
    from layerloop.datasets.shards import read_samples, shard_paths

    url, result = s3_run
    assert [p.name for p in shard_paths(url)] == [f"demo-00000{i}.tar" for i in range(4)]
    remote = list(read_samples(url))
    local = list(read_samples(local_run))
    assert [s.key for s in remote] == [s.key for s in local] and len(remote) == result.ok
    assert all((a.composite == b.composite).all() for a, b in zip(remote, local))
    assert [s.key for s in read_samples(f"{url}/demo-{{000000..000001}}.tar")] == [s.key for s in local[:4]]
    assert main(["inspect", url]) == 0
    out = capsys.readouterr().out
    assert f"at {url}" in out and "4 committed" in out and f"{result.ok} ok" in out


def test_second_writer_on_s3_is_refused_with_the_holder(s3, demo_data, capsys):
    from layerloop.cli import main
    from layerloop.pipelines.runs import RunDirectory

    url = f"s3://{s3.bucket()}/busy"
    with RunDirectory(url):
        code = main(["build", "demo", "--out", url, "--executor", "local", "--no-progress",
                     *overrides(demo_data)])
    err = capsys.readouterr().err
    assert code == 2 and "in use by another layerloop run (pid" in err and err.count("\n") == 1


def test_an_unexpired_lease_of_another_host_refuses(s3, demo_data, capsys):
    import json

    from layerloop.cli import main

    url = f"s3://{s3.bucket()}/other-host"
    holder = "pid 4242 on gpu-node-7 since 2026-12-03T01:00:00"
    (storage.location(url) / storage.LEASE_NAME).write_bytes(
        json.dumps({"holder": holder, "token": "t", "expires": time.time() + 60}).encode())
    code = main(["build", "demo", "--out", url, "--executor", "local", "--no-progress", *overrides(demo_data)])
    err = capsys.readouterr().err
    assert code == 2 and holder in err and err.count("\n") == 1


def test_store_errors_are_one_line(s3, demo_data, capsys, monkeypatch):
    from layerloop.cli import main

    code = main(["build", "demo", "--out", "s3://no-such-bucket-ll/x", "--executor", "local", "--no-progress",
                 *overrides(demo_data)])
    err = capsys.readouterr().err
    assert code == 4 and err.count("\n") == 1
    assert "s3://no-such-bucket-ll/x" in err and "bucket no-such-bucket-ll does not exist" in err
    assert main(["inspect", "s3://no-such-bucket-ll/x"]) == 4
    assert "does not exist" in capsys.readouterr().err

    bucket = s3.bucket()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    storage._FILESYSTEMS.clear()
    try:
        code = main(["build", "demo", "--out", f"s3://{bucket}/x", "--executor", "local", "--no-progress",
                     *overrides(demo_data)])
    finally:
        storage._FILESYSTEMS.clear()
    err = capsys.readouterr().err
    assert code == 4 and err.count("\n") == 1 and "no credentials found" in err
    assert s3.keys(bucket) == []  # nothing written


def test_cli_build_to_s3_writes_its_report_and_logs_to_the_store(s3, demo_data, tmp_path, capsys):
    import json

    from layerloop.cli import main

    url = f"s3://{s3.bucket()}/reported"
    args = ["build", "demo", "--out", url, "--executor", "local", "--no-progress", *overrides(demo_data)]
    assert main(args) == 0
    root = storage.location(url)
    stats = json.loads((root / "report" / "stats.json").read_text())
    assert stats["samples_ok"] >= 6 and stats["sampled"]["rows"] == 4
    assert (root / "report" / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = (root / "logs" / "layerloop.log").read_text()
    assert "build" in first and SECRET not in first
    assert main(args) == 0  # a resume (here: nothing to do) appends to the log the store holds
    capsys.readouterr()
    second = (root / "logs" / "layerloop.log").read_text()
    assert second.startswith(first) and len(second) > len(first)
    (root / "report" / "stats.json").unlink()
    assert main(["report", url, "--rows", "2"]) == 0
    assert f"wrote {url}/report" in capsys.readouterr().out
    assert json.loads((root / "report" / "stats.json").read_text())["sampled"]["rows"] == 2


def test_demo_source_rendering_into_a_store_is_refused(s3, capsys):
    from layerloop.cli import main

    url = f"s3://{s3.bucket()}/x"
    assert main(["build", "demo", "--out", url, "--executor", "local", *SMALL]) == 2
    assert "layerloop demo-data DIR" in capsys.readouterr().err


def test_dropped_connection_is_one_line_and_the_resume_gives_the_same_bytes(s3, demo_data, local_run, capsys,
                                                                           monkeypatch):
    from layerloop.cli import main
    from layerloop.datasets.shards import ShardWriter

    proxy = Proxy(s3.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    storage._FILESYSTEMS.clear()
    bucket = s3.bucket()
    url = f"s3://{bucket}/dropped"
    real_write = ShardWriter.write
    calls = []

    def write_then_drop(self, index, samples):
        summary = real_write(self, index, samples)
        calls.append(index)
        if len(calls) == 2:
            proxy.down()  # the network goes away after two shards are committed
        return summary

    monkeypatch.setattr(ShardWriter, "write", write_then_drop)
    try:
        code = main(["build", "demo", "--out", url, "--executor", "local", "--no-progress", *overrides(demo_data)])
        err = capsys.readouterr().err
        assert code == 4 and err.count("\n") == 1 and "cannot reach the store endpoint" in err and url in err
        monkeypatch.setattr(ShardWriter, "write", real_write)
        proxy.up()
        storage._FILESYSTEMS.clear()
        result = build(load_config("demo", overrides(demo_data, "executor=local")), out=url, progress=False)
        assert result.shards_skipped == 2 and result.shards_built == 2
        assert store_bytes(s3, url) == local_bytes(local_run)
    finally:
        proxy.down()
        storage._FILESYSTEMS.clear()


def test_killed_build_to_s3_resumes_to_the_same_bytes(s3, demo_data, local_run):
    bucket = s3.bucket()
    url = f"s3://{bucket}/killed"
    command = [sys.executable, "-m", "layerloop.cli", "build", "demo", "--out", url, "--executor", "local",
               "--no-progress", *overrides(demo_data)]
    committed = []
    for _attempt in range(3):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            committed = [k for k in s3.keys(bucket, "killed/") if k.endswith(".parquet") and "/demo-" in k]
            if committed:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if 1 <= len(committed) < 4:
            break
    assert 1 <= len(committed) < 4, "the build finished before it could be killed"
    # The killed driver's lease is left behind, unexpired; it names a process of this host that is gone, so
    # the next run takes it over at once (as the kernel releases a dead process's flock).
    lease = storage.read_lease(storage.location(url) / storage.LEASE_NAME)
    assert lease is not None and not lease.expired and f"pid {process.pid} on" in lease.holder
    result = build(load_config("demo", overrides(demo_data, "executor=local")), out=url, progress=False)
    assert result.shards_skipped >= len(committed)
    assert store_bytes(s3, url) == local_bytes(local_run)


# ============================================================================= Ray, webdataset, the stream
@pytest.fixture(scope="module")
def ray_s3(s3, tmp_path_factory):
    """Ray whose workers see the S3 fixture's environment (endpoint and fake credentials) and a staging
    base of their own (never the user's cache). A Ray started earlier in the session (without it) is
    restarted with it; tests after this module only use local files."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    staging = str(tmp_path_factory.mktemp("ray-workers-staging"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", storage.STAGING_ENV: staging, **s3.env}})
    yield ray


@pytest.mark.ray
def test_ray_build_to_s3_writes_straight_to_the_store_and_equals_local(s3, ray_s3, demo_data, local_run,
                                                                       monkeypatch):
    from layerloop.datasets.shards import ShardWriter

    def no_driver_hop(self, index, samples):
        raise AssertionError(f"the driver wrote shard {index}: samples went through it")

    # Patched in this (the driver's) process only: Ray workers import the real class, so the build passes
    # only when every shard is committed by a worker, straight to the store.
    monkeypatch.setattr(ShardWriter, "_write_stored", no_driver_hop)
    url = f"s3://{s3.bucket()}/ray"
    build(load_config("demo", overrides(demo_data, "executor=ray")), out=url, progress=False)
    assert store_bytes(s3, url) == local_bytes(local_run)


@pytest.mark.ray
def test_s3_shards_read_by_webdataset_and_ray_read_webdataset(s3, s3_run, ray_s3):
    import io

    import webdataset as wds
    from PIL import Image

    from layerloop.datasets.shards import shard_paths

    url, result = s3_run
    tars = shard_paths(url)
    records = list(wds.WebDataset([storage.webdataset_url(t) for t in tars], shardshuffle=False))
    assert len(records) == result.ok
    assert Image.open(io.BytesIO(records[0]["foreground.png"])).mode == "RGBA"

    filesystem, _ = storage.arrow_filesystem(url)
    rows = ray_s3.data.read_webdataset([t.path for t in tars], filesystem=filesystem).take_all()
    assert len(rows) == result.ok
    assert sorted(r["__key__"] for r in rows) == sorted(r["__key__"] for r in records)


def test_training_stream_from_s3_shards_resumes_exactly(s3, s3_run, local_run):
    import json

    from layerloop.datasets.stream import ShardStream, WeightedShards

    url, _ = s3_run

    def make(where):
        return ShardStream([WeightedShards(run_dir=str(where), name="demo")], batch_size=2, shuffle_buffer=4, seed=3)

    def keys(stream, n):
        return [[s.key for s in stream.next_batch()] for _ in range(n)]

    remote, local = make(url), make(local_run)
    assert remote.state_dict() == local.state_dict()  # same shards, same fingerprint: a checkpoint moves freely
    expected = keys(make(local_run), 6)
    assert keys(remote, 3) == expected[:3]
    state = json.loads(json.dumps(remote.state_dict()))
    resumed = make(url)
    resumed.load_state_dict(state)
    assert keys(resumed, 3) == expected[3:]
    sample = make(url).next_batch()[0]
    same = make(local_run).next_batch()[0]
    assert sample.key == same.key and (sample.foreground == same.foreground).all()
    brace = ShardStream([WeightedShards(urls=f"{url}/demo-{{000000..000003}}.tar", name="demo")], batch_size=2,
                        shuffle_buffer=4, seed=3)
    assert keys(brace, 6) == expected


def test_webdataset_source_reads_s3_shards_by_ranged_gets(s3, s3_run, local_run):
    from layerloop.datasets.sources import build_source
    from layerloop.stages.registry import build_stage

    url, result = s3_run
    remote = build_source({"type": "webdataset", "urls": f"{url}/demo-{{000000..000003}}.tar", "name": "wds"})
    local = build_source({"type": "webdataset", "urls": f"{local_run}/demo-{{000000..000003}}.tar", "name": "wds"})
    items, local_items = remote.items(), local.items()
    assert [i.key for i in items] == [i.key for i in local_items] and len(items) == result.ok
    assert remote.listing_failures() == local.listing_failures() == []
    assert all(i.refs["seekable"] for i in items)  # plain tars in a store: members read by offset
    load = build_stage({"stage": "load", "short_side": 64}, seed=0)
    for item, local_item in zip(items[:3], local_items[:3]):
        a, b = load.process_sample(remote.read(item)), load.process_sample(local.read(local_item))
        assert (a.work["image"] == b.work["image"]).all() and (a.object_mask == b.object_mask).all()
    missing = build_source({"type": "webdataset", "urls": f"{url}/nope-000000.tar", "name": "wds"})
    assert missing.items() == [] and len(missing.listing_failures()) == 1
    assert "nope-000000.tar" in missing.listing_failures()[0].message


# ============================================================================= sources on S3
def upload_tree(s3, folder: Path, bucket: str, prefix: str, rename: dict[str, str] | None = None) -> str:
    client = s3.client()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            relative = path.relative_to(folder).as_posix()
            for old, new in (rename or {}).items():
                relative = relative.replace(old, new, 1) if relative.startswith(old) else relative
            client.put_object(Bucket=bucket, Key=f"{prefix}/{relative}", Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


def test_rorem_source_on_s3_builds_the_bytes_of_the_same_folder_on_disk(s3, demo_data, tmp_path):
    bucket = s3.bucket()
    scenes = upload_tree(s3, demo_data, bucket, "RORem")
    rorem = ["source.type=rorem", "executor=local"]
    local = tmp_path / "local"
    build(load_config("demo", overrides(demo_data, *rorem)), out=local, progress=False)
    url = f"s3://{bucket}/runs/rorem"
    result = build(load_config("demo", [*SMALL, *rorem, f"source.path={scenes}"]), out=url, progress=False)
    assert result.ok >= 6 and store_bytes(s3, url) == local_bytes(local)


def test_folder_source_on_s3_matches_the_local_folder(s3, demo_data, tmp_path):
    from layerloop.datasets.sources import build_source
    from layerloop.stages.registry import build_stage

    folder = tmp_path / "folder"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for image in sorted((demo_data / "source").iterdir())[:4]:
        (folder / "images" / image.name).write_bytes(image.read_bytes())
        (folder / "masks" / image.name).write_bytes((demo_data / "mask" / image.name).read_bytes())
    first = sorted((folder / "images").iterdir())[0]
    first.with_suffix(".txt").write_text("a caption from S3\n")
    (folder / "masks" / "orphan.png").write_bytes((folder / "masks" / first.name).read_bytes())
    url = upload_tree(s3, folder, s3.bucket(), "data/folder")
    remote, local = (build_source({"type": "folder", "path": p, "name": "f"}) for p in (url, str(folder)))
    assert [(i.key, i.caption) for i in remote.items()] == [(i.key, i.caption) for i in local.items()]
    assert remote.items()[0].caption == "a caption from S3"
    assert [f.message.split(" has no ")[0].rsplit("/", 1)[-1] for f in remote.listing_failures()] == ["orphan.png"]
    load = build_stage({"stage": "load", "short_side": 64}, seed=0)
    a = load.process_sample(remote.read(remote.items()[1]))
    b = load.process_sample(local.read(local.items()[1]))
    assert (a.work["image"] == b.work["image"]).all() and (a.object_mask == b.object_mask).all()
    storage.location(f"{url}/images/{first.name}").unlink()
    from layerloop.datasets.imageio import InputError

    with pytest.raises(InputError, match="image: file is missing: s3://"):  # removed after listing: a failure
        load.process_sample(remote.read(remote.items()[0]))


def test_rorem_meta_paths_leaving_the_root_on_s3_are_listing_failures(s3):
    import json

    bucket = s3.bucket()
    root = storage.location(f"s3://{bucket}/R")
    entries = [{"source": "source/a.png", "mask": "mask/a.png"},
               {"source": "../elsewhere/b.png", "mask": "mask/b.png"},
               {"source": "/etc/passwd", "mask": "mask/c.png"},
               {"source": f"s3://{bucket}/other/d.png", "mask": "mask/d.png"}]
    (root / "meta.json").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    from layerloop.datasets.sources import build_source

    source = build_source({"type": "rorem", "path": root.url, "name": "r"})
    assert [i.refs["image"] for i in source.items()] == [f"s3://{bucket}/R/source/a.png"]
    failures = source.listing_failures()
    assert len(failures) == 3 and all(f.error_type == "OutsideRoot" for f in failures)
    assert all("outside the dataset root" in f.message for f in failures)


def hf_imagefolder(demo_data: Path, folder: Path, n: int = 4) -> Path:
    """A Hugging Face imagefolder of the demo scenes: ``train/`` images, masks in a sub-folder named by
    ``mask_file_name``, captions in ``metadata.jsonl``."""
    import json

    train = folder / "train"
    (train / "masks").mkdir(parents=True)
    rows = []
    for i, image in enumerate(sorted((demo_data / "source").iterdir())[:n]):
        (train / image.name).write_bytes(image.read_bytes())
        (train / "masks" / image.name).write_bytes((demo_data / "mask" / image.name).read_bytes())
        rows.append({"file_name": image.name, "mask_file_name": f"masks/{image.name}", "text": f"scene {i}"})
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_hf_imagefolder_on_s3_reads_each_image_from_the_store_and_matches_local(s3, demo_data, tmp_path,
                                                                                 monkeypatch):
    from layerloop.datasets.sources import StoredFile, build_source
    from layerloop.stages.registry import build_stage

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = hf_imagefolder(demo_data, tmp_path / "hf")
    url = upload_tree(s3, folder, s3.bucket(), "data/hf")
    spec = {"type": "hf", "caption_column": "text", "name": "h", "cache_dir": str(tmp_path / "cache")}
    remote, local = (build_source({**spec, "path": p}) for p in (url, str(folder)))
    assert remote.resolved_format() == "imagefolder"
    assert [(i.key, i.caption) for i in remote.items()] == [(i.key, i.caption) for i in local.items()]
    assert [i.caption for i in remote.items()] == [f"scene {i}" for i in range(4)]
    assert remote.listing_failures() == []
    load = build_stage({"stage": "load", "short_side": 64}, seed=0)
    for r, l in zip(remote.items(), local.items()):
        sample = remote.read(r)
        assert isinstance(sample.work["raw_image"], StoredFile) and sample.work["raw_image"].url.startswith(url)
        a, b = load.process_sample(sample), load.process_sample(local.read(l))
        assert (a.work["image"] == b.work["image"]).all() and (a.object_mask == b.object_mask).all()
    cached = [p for p in (tmp_path / "hf-cache").rglob("*.png")] + [p for p in (tmp_path / "cache").rglob("*.png")]
    assert cached == []  # images are read from the store, not copied into a cache


def test_hf_build_from_s3_equals_a_build_from_the_local_folder(s3, demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = hf_imagefolder(demo_data, tmp_path / "hf", n=4)
    url = upload_tree(s3, folder, s3.bucket(), "hf")
    hf = ["source.type=hf", "source.caption_column=text", "source.name=hf", "executor=local"]
    local = tmp_path / "local"
    build(load_config("demo", [*SMALL, *hf, f"source.path={folder}"]), out=local, progress=False)
    out = tmp_path / "remote"
    result = build(load_config("demo", [*SMALL, *hf, f"source.path={url}"]), out=out, progress=False)
    assert result.ok == 4
    assert local_bytes(out) == local_bytes(local) and len(local_bytes(local)) == 5


def test_hf_parquet_and_saved_datasets_on_s3_with_paths_leaving_the_root(s3, demo_data, tmp_path, monkeypatch):
    import datasets

    from layerloop.datasets.sources import build_source

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    images = sorted((demo_data / "source").iterdir())[:3]
    embedded = {"image": [{"bytes": p.read_bytes(), "path": None} for p in images],
                "mask": [{"bytes": (demo_data / "mask" / p.name).read_bytes(), "path": None} for p in images],
                "text": [f"p{i}" for i in range(3)]}
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image(),
                                  "text": datasets.Value("string")})
    bucket = s3.bucket()
    parquet = tmp_path / "pq" / "part-0.parquet"
    parquet.parent.mkdir()
    datasets.Dataset.from_dict(embedded, features=features).to_parquet(str(parquet))
    url = upload_tree(s3, parquet.parent, bucket, "pq")
    source = build_source({"type": "hf", "path": url, "caption_column": "text", "name": "pq",
                           "cache_dir": str(tmp_path / "cache")})
    assert source.resolved_format() == "parquet" and [i.caption for i in source.items()] == ["p0", "p1", "p2"]
    assert source.read(source.items()[2]).work["raw_image"] == images[2].read_bytes()

    # paths relative to the data set: inside the root they are read from the store, outside are listing failures
    root = storage.location(f"s3://{bucket}/saved")
    for p in images:
        (root / "img" / p.name).write_bytes(p.read_bytes())
        (root / "img" / f"m-{p.name}").write_bytes((demo_data / "mask" / p.name).read_bytes())
    by_path = {"image": [f"img/{images[0].name}", f"../elsewhere/{images[1].name}", f"img/{images[2].name}"],
               "mask": [f"img/m-{p.name}" for p in images], "text": ["a", "b", "c"]}
    datasets.Dataset.from_dict(by_path).save_to_disk(root.url)
    source = build_source({"type": "hf", "path": root.url, "caption_column": "text", "name": "sv",
                           "cache_dir": str(tmp_path / "sv-cache")})
    assert source.resolved_format() == "disk"
    assert [i.key for i in source.items()] == ["sv_0", "sv_2"]
    failure, = source.listing_failures()
    assert failure.key == "sv_1" and failure.error_type == "OutsideRoot" and "outside the dataset root" in failure.message
    read = source.read(source.items()[1]).work
    assert read["raw_image"].url == f"{root.url}/img/{images[2].name}"
    assert read["raw_image"].read() == images[2].read_bytes()
    copied = sorted(p.name for p in (tmp_path / "sv-cache" / "hf-store").rglob("*") if p.is_file())
    assert copied == sorted([".mirror.json", "data-00000-of-00001.arrow", "dataset_info.json", "state.json"])


def _train(run_dir, out):
    from layerloop.training import load_train_config, run_training

    cfg = load_train_config({
        "name": "t", "family": "bfs", "stage": "stage1", "model": "tiny", "steps": 4, "lr": 1e-2,
        "batch_size": 2, "checkpoint_every": 2, "keep": 2, "seed": 7, "shuffle_buffer": 4,
        "data": [{"name": "demo", "run_dir": str(run_dir)}],
        "task": {"resolution": 16, "phi_checkpoint": "untrained"}})
    run_training(cfg, out)
    return {p.name: p.read_bytes() for p in sorted((out / "final").iterdir()) if p.suffix == ".safetensors"}


@pytest.fixture(scope="module")
def trained(local_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "bfs"
    return out, _train(local_run, out)


def test_training_reads_its_data_run_dir_from_s3_to_the_same_weights(s3, s3_run, trained, tmp_path):
    url, _ = s3_run
    remote = _train(url, tmp_path / "from-s3")
    assert remote and remote == trained[1]
    assert SECRET not in (tmp_path / "from-s3" / "train.json").read_text()


def test_generate_reads_held_shards_from_s3_and_writes_candidates_to_s3(s3, s3_run, local_run, trained, tmp_path):
    url, _ = s3_run
    common = [f"stages.generate-bfs.checkpoint={trained[0] / 'final'}", "executor=local",
              "shards.samples_per_shard=4", "stages.generate-bfs.steps=2"]
    local = tmp_path / "candidates"
    build(load_config("generate_bfs_demo", [*common, f"source.urls={local_run}/demo-{{000000..000003}}.tar"]),
          out=local, progress=False)
    out = f"s3://{s3.bucket()}/candidates"
    result = build(load_config("generate_bfs_demo", [*common, f"source.urls={url}/demo-{{000000..000003}}.tar"]),
                   out=out, progress=False)
    assert result.ok >= 4
    want = {p.name: p.read_bytes() for p in sorted(local.iterdir()) if p.name.startswith("candidates-")}
    bucket, prefix = out[len("s3://"):].split("/", 1)
    got = {k.rsplit("/", 1)[1]: s3.client().get_object(Bucket=bucket, Key=k)["Body"].read()
           for k in s3.keys(bucket, prefix + "/") if "/candidates-" in k}
    assert want and got == want


@pytest.mark.slow
def test_self_improvement_round_with_out_on_s3(s3, tmp_path, monkeypatch, capsys):
    import yaml

    from layerloop.cli import main
    from layerloop.selfimprove.loop import self_improve
    from tests.selfimprove.test_selfimprove_loop import bfs_config

    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    config = tmp_path / "si.yaml"
    config.write_text(yaml.safe_dump(bfs_config()))
    local = tmp_path / "local"
    self_improve(bfs_config(), rounds=1, out=local)
    url = f"s3://{s3.bucket()}/si"
    assert main(["self-improve", str(config), "--rounds", "1", "--out", url, "--no-progress"]) == 0
    assert "round 0:" in capsys.readouterr().out
    bucket, prefix = url[len("s3://"):].split("/", 1)
    keys = [k[len(prefix) + 1:] for k in s3.keys(bucket, prefix + "/")]
    assert "selfimprove.json" in keys and "run.lease" not in keys and not [k for k in keys if ".tmp-" in k]
    tars = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.tar"))
    assert any(t.startswith("rounds/round-000/accepted/") for t in tars)
    client = s3.client()
    staging = storage.staging_dir(url)
    for name in keys:  # the store holds exactly the staging folder's files
        assert client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read() == (staging / name).read_bytes()
    from layerloop.datasets.tario import iter_samples

    for name in tars:
        # The loop's records name its own folder (lineage paths), so whole tars equal the local run's only
        # for the built data; every image member, key and checkpoint hash does everywhere.
        ours, theirs = dict(iter_samples(str(staging / name))), dict(iter_samples(str(local / name)))
        assert ours.keys() == theirs.keys() and ours
        for key in ours:
            assert {m: v for m, v in ours[key].items() if m.endswith(".png")} == \
                {m: v for m, v in theirs[key].items() if m.endswith(".png")}, (name, key)
        if name.startswith("data/"):
            assert (staging / name).read_bytes() == (local / name).read_bytes()
    # Another machine (no staging folder): the same command pulls the loop and finds round 0 done.
    import shutil

    shutil.rmtree(tmp_path / "staging")
    assert main(["self-improve", str(config), "--rounds", "1", "--out", url, "--no-progress"]) == 0
    assert "1 round(s)" in capsys.readouterr().out
    assert sorted(k[len(prefix) + 1:] for k in s3.keys(bucket, prefix + "/")) == sorted(keys)
    # inspect reads the loop's records from a local mirror (no tars, no checkpoints)
    assert main(["inspect", url]) == 0
    printed = capsys.readouterr()
    assert "round-000: 6 candidates" in printed.out and "local copy of its records" in printed.err
    assert f"at {url}\n" in printed.out and f"report: {url}/report/index.html" in printed.out
    mirrored = [p for p in storage.cache_dir(url, "inspect").rglob("*") if p.is_file()]
    assert mirrored and not [p for p in mirrored if p.suffix in (".tar", ".safetensors", ".png")]
    key = next(iter(iter_samples(str(staging / tars[-1]))))[0]
    assert main(["inspect", url, "--key", key]) == 0 and key in capsys.readouterr().out  # traced in staging
    shutil.rmtree(tmp_path / "staging")
    assert main(["inspect", url, "--key", key]) == 2
    assert "name the staging folder" in capsys.readouterr().err


def test_evaluate_with_out_on_s3_and_compare_reads_it_from_the_store(s3, local_run, s3_run, tmp_path, monkeypatch,
                                                                      capsys):
    """The evaluation on the store also reads its held-out run from the store (the same shards as the local
    one's): the metrics are the local evaluation's."""
    import json

    import yaml

    from layerloop.cli import main
    from layerloop.evaluation.compare import compare_table

    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "name": "eval-s3", "family": "bfs", "executor": "local",
        "heldout": {"run_dir": str(local_run), "select": 4, "seed": 3},
        "methods": [{"name": "ld-oc", "stages": [{"stage": "trimap"}, {"stage": "matting", "backend": "closed-form"},
                                                 {"stage": "background", "backend": "opencv"}, {"stage": "recompose"}]},
                    {"name": "ground-truth", "stages": [{"stage": "ground-truth"}]}],
        "metrics": {"clip_model": "tiny", "hps_model": "tiny", "musiq_model": "tiny", "maniqa_model": "tiny",
                    "dino_model": "tiny"},
        "kid_subset_size": 3, "kid_subsets": 4, "sheet_rows": 2}))
    local = tmp_path / "local-eval"
    assert main(["evaluate", str(config), "--out", str(local), "--no-progress"]) == 0
    url = f"s3://{s3.bucket()}/eval"
    stored = tmp_path / "eval-stored.yaml"
    data = yaml.safe_load(config.read_text())
    stored.write_text(yaml.safe_dump({**data, "heldout": {**data["heldout"], "run_dir": s3_run[0]}}))
    assert main(["evaluate", str(stored), "--out", url, "--no-progress"]) == 0
    capsys.readouterr()
    remote = json.loads(storage.location(f"{url}/metrics.json").read_text())
    assert remote["metrics"] == json.loads((local / "metrics.json").read_text())["metrics"]
    assert set(remote["metrics"]) == {"ld-oc", "ground-truth"}
    bucket, prefix = url[len("s3://"):].split("/", 1)
    keys = [k[len(prefix) + 1:] for k in s3.keys(bucket, prefix + "/")]
    assert "per_sample.parquet" in keys and "run.lease" not in keys and not [k for k in keys if ".tmp-" in k]
    table = compare_table([url, str(local)])
    assert table.count("| ground-truth |") == 2 and f"| {url} |" in table
    assert main(["compare", url]) == 0 and "| ld-oc |" in capsys.readouterr().out


def test_train_with_out_on_s3_syncs_its_folder_and_resumes_from_the_store(s3, s3_run, tmp_path, monkeypatch,
                                                                          capsys):
    import shutil

    from layerloop.cli import main
    from layerloop.training import load_training, run_training

    url, _ = s3_run
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    overrides = [f"data.demo.run_dir={url}", "steps=4", "checkpoint_every=2", "batch_size=2", "shuffle_buffer=8",
                 "task.resolution=16"]
    local = tmp_path / "local"
    run_training(load_training("train_bfs_demo", overrides), local)
    out = f"s3://{s3.bucket()}/bfs"
    assert main(["train", "train_bfs_demo", *overrides, "--out", out, "--no-progress"]) == 0
    assert "trained 4 steps" in capsys.readouterr().err
    final = storage.location(out) / "final"
    weights = sorted(p.name for p in (local / "final").iterdir() if p.suffix == ".safetensors")
    assert weights and all((final / w).read_bytes() == (local / "final" / w).read_bytes() for w in weights)
    shutil.rmtree(tmp_path / "staging")  # another machine: the finished run is pulled, nothing is retrained
    assert main(["train", "train_bfs_demo", *overrides, "--out", out, "--no-progress"]) == 0
    assert all((final / w).read_bytes() == (local / "final" / w).read_bytes() for w in weights)

