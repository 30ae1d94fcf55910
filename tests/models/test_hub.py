import multiprocessing
import threading
from pathlib import Path

import pytest

from layerloop.models import hub
from layerloop.models.hub import ModelNotAvailable

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_home(monkeypatch, tmp_path):
    """A fresh, empty Hugging Face home with downloads switched off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf" / "hub"


def _fake_snapshot(cache: Path, repo_id: str, files: dict[str, str]) -> Path:
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_local_directory_wins(tmp_path, offline_home):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert hub.resolve(folder) == folder.resolve()
    assert hub.resolve(str(folder), filename="config.json") == (folder / "config.json").resolve()
    assert hub.is_available(folder)


def test_local_folder_without_the_file(tmp_path, offline_home):
    with pytest.raises(ModelNotAvailable, match="has no file 'weights.pt'"):
        hub.resolve(tmp_path, filename="weights.pt")


def test_missing_local_path_is_not_looked_up_on_the_hub(tmp_path, offline_home):
    with pytest.raises(ModelNotAvailable, match="local path does not exist"):
        hub.resolve(str(tmp_path / "nowhere" / "model"))


def test_offline_and_missing(offline_home):
    with pytest.raises(ModelNotAvailable) as info:
        hub.resolve("someone/not-downloaded", revision="v2")
    message = str(info.value)
    assert "'someone/not-downloaded'" in message and "revision 'v2'" in message
    assert "layerloop models pull CONFIG" in message
    assert "copy the model folder" in message
    assert str(offline_home) in message
    assert not hub.is_available("someone/not-downloaded")


def test_offline_and_missing_single_file(offline_home):
    with pytest.raises(ModelNotAvailable, match="file 'HPS_v2.1_compressed.pt'"):
        hub.resolve("xswu/HPSv2", filename="HPS_v2.1_compressed.pt")


def test_downloads_disabled_without_offline_env(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotAvailable, match="downloads are disabled"):
        hub.resolve("someone/not-downloaded", cache_dir=tmp_path, allow_download=False)


def test_cache_hit_for_snapshot_and_file(offline_home):
    snapshot = _fake_snapshot(offline_home, "owner/model", {"config.json": "{}", "sub/weights.pt": "w"})
    assert hub.resolve("owner/model") == snapshot
    assert hub.resolve("owner/model", revision=COMMIT) == snapshot
    assert hub.resolve("owner/model", filename="sub/weights.pt") == snapshot / "sub" / "weights.pt"
    assert hub.is_available("owner/model")
    assert not hub.is_available("owner/model", filename="other.pt")


def test_explicit_cache_dir(tmp_path, offline_home):
    cache = tmp_path / "elsewhere"
    snapshot = _fake_snapshot(cache, "owner/model", {"config.json": "{}"})
    assert hub.resolve("owner/model", cache_dir=cache) == snapshot
    assert not hub.is_available("owner/model")  # not in the default (HF_HOME) cache


def _hold_lock_then_write(cache, started, release):
    # Plays another worker on the node that is downloading: holds the lock and fills the cache.
    from filelock import FileLock

    lock = Path(cache) / ".locks" / "layerloop" / "owner--late.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        started.set()
        release.wait(30)
        _fake_snapshot(Path(cache), "owner/late", {"config.json": "{}"})


def test_waits_for_a_download_in_progress(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub.hub_constants, "HF_HUB_OFFLINE", False)

    def no_network():
        raise AssertionError("resolve downloaded although another worker had just fetched the model")

    monkeypatch.setattr(hub.huggingface_hub, "snapshot_download",
                        _local_only(hub.huggingface_hub.snapshot_download, no_network))
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    started, release = context.Event(), context.Event()
    worker = context.Process(target=_hold_lock_then_write, args=(str(cache), started, release))
    worker.start()
    result = {}
    try:
        assert started.wait(30)
        waiter = threading.Thread(target=lambda: result.update(path=hub.resolve("owner/late", cache_dir=cache)))
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive(), "resolve did not wait for the lock held by the downloading worker"
        release.set()
        waiter.join(30)
    finally:
        release.set()
        worker.join(30)
    assert result["path"] == cache / "models--owner--late" / "snapshots" / COMMIT


def _local_only(real, on_download):
    def wrapper(*args, local_files_only=False, **kwargs):
        if not local_files_only:
            on_download()
        return real(*args, local_files_only=True, **kwargs)

    return wrapper


def test_resolve_folder_checks_the_diffusers_subfolders(tmp_path, offline_home):
    folder = tmp_path / "fill"
    (folder / "transformer").mkdir(parents=True)
    (folder / "vae").mkdir()
    assert hub.resolve_folder(folder, ("transformer", "vae")) == folder.resolve()
    with pytest.raises(ModelNotAvailable, match=r"lacks \['text_encoder'\]"):
        hub.resolve_folder(folder, ("transformer", "text_encoder"))
    snapshot = _fake_snapshot(offline_home, "owner/fill", {"model_index.json": "{}", "vae/config.json": "{}"})
    assert hub.resolve_folder("owner/fill", ("vae",)) == snapshot
    with pytest.raises(ModelNotAvailable, match="(?s)owner/other.*layerloop models pull"):
        hub.resolve_folder("owner/other", ("vae",))
