"""What MUSIQ and MANIQA share through ``models/iqa.QualityScorer``: saving and loading their checkpoint
format, pyiqa's wrapped / DataParallel checkpoints, and the offline error naming the published file."""

import json

import numpy as np
import pytest
import torch

from layerloop.models import maniqa, musiq
from layerloop.models.hub import ModelNotAvailable

# scorer class, image shapes it handles, the published file's name
CASES = {"musiq": (musiq.MusiqScorer, [(40, 28), (20, 70)], "musiq_koniq_ckpt-e95806b9.pth"),
         "maniqa": (maniqa.ManiqaScorer, [(50, 70), (64, 64)], "ckpt_koniq10k.pt")}


def _images(seed, shapes):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    cls, shapes, published = CASES[request.param]
    scorer = cls.tiny(seed=0)
    if request.param == "maniqa":  # lift the random head above its final ReLU, so scores differ (test_maniqa.py)
        with torch.no_grad():
            scorer.net.fc_score[3].bias.fill_(0.5)
    return request.param, cls, scorer, shapes, published


def test_save_and_load_round_trip(case, tmp_path):
    name, cls, scorer, shapes, _ = case
    images = _images(3, shapes)
    scorer.save_pretrained(tmp_path / name)
    assert (tmp_path / name / cls.DEFAULT_FILENAME).is_file()
    assert json.loads((tmp_path / name / f"{name}_config.json").read_text()) == cls.TINY_CONFIG
    from_folder = cls.from_pretrained(tmp_path / name)
    from_file = cls.from_pretrained(tmp_path / name / cls.DEFAULT_FILENAME)
    expected = scorer.score(images)
    np.testing.assert_array_equal(from_folder.score(images), expected)
    np.testing.assert_array_equal(from_file.score(images), expected)
    assert from_folder.describe() == {"model": str(tmp_path / name), "file": cls.DEFAULT_FILENAME, "revision": None}
    assert from_file.describe()["model"] == str(tmp_path / name / cls.DEFAULT_FILENAME)


@pytest.mark.parametrize("wrapper", ["params", "state_dict"])
def test_wrapped_and_ddp_checkpoints_load(case, wrapper, tmp_path):
    _, cls, scorer, shapes, _ = case
    state = {"module." + k: v for k, v in scorer.net.state_dict().items()}
    torch.save({wrapper: state}, tmp_path / "wrapped.pt")
    loaded = cls.from_pretrained(tmp_path / "wrapped.pt", config=cls.TINY_CONFIG)
    images = _images(4, shapes[:1])
    np.testing.assert_array_equal(loaded.score(images), scorer.score(images))


def test_offline_and_missing_raises(case, monkeypatch, tmp_path):
    _, cls, _, _, published = case
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotAvailable, match="layerloop models pull") as info:
        cls.from_pretrained()
    assert "chaofengc/IQA-PyTorch-Weights" in str(info.value) and published in str(info.value)
