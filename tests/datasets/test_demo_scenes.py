"""The demo scene generator: layout, determinism, idempotence, and that the scenes mean what they say
(GT is the clean background, the mask is the object only, the shadow is real and falls away from the
light)."""

from __future__ import annotations

import json
import math
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from layerloop.datasets import demo_scenes
from layerloop.datasets.demo_scenes import generate_demo_data, render_scene

SIZE = 128  # small scenes keep the file fast; the geometry is resolution independent


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _near_object_or_shadow(scene, grow=3):
    touched = (scene["coverage"] > 0) | (scene["shadow"] > 0)
    return cv2.dilate(touched.astype(np.uint8), np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)) > 0


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(seed=3, index=i, size=SIZE) for i in range(12)]


def test_layout_and_meta_entries(tmp_path):
    out = generate_demo_data(tmp_path / "demo", n=3, seed=1, size=SIZE)
    assert out == tmp_path / "demo"
    entries = json.loads((out / "meta.json").read_text())
    assert [e["id"] for e in entries] == ["scene_000000", "scene_000001", "scene_000002"]
    for entry in entries:
        sid = entry["id"]
        assert entry["source"] == f"source/{sid}.png"
        assert entry["GT"] == f"GT/{sid}.png"
        assert entry["mask"] == f"mask/{sid}.png"
        assert entry["object"] in entry["caption"] or " and " in entry["object"]
        assert all(category in demo_scenes.CATEGORIES for category in entry["objects"])
        source, gt, mask = (Image.open(out / entry[k]) for k in ("source", "GT", "mask"))
        assert (source.mode, gt.mode, mask.mode) == ("RGB", "RGB", "L")
        assert source.size == gt.size == mask.size == (SIZE, SIZE)
    assert sorted(p.name for p in out.iterdir()) == ["GT", "demo.json", "mask", "meta.json", "source"]
    assert json.loads((out / "demo.json").read_text())["n"] == 3


def test_written_files_are_render_scene(tmp_path):
    out = generate_demo_data(tmp_path, n=2, seed=5, size=SIZE)
    for index in range(2):
        scene = render_scene(5, index, SIZE)
        sid = demo_scenes.scene_id(index)
        assert np.array_equal(np.asarray(Image.open(out / "source" / f"{sid}.png")), scene["source"])
        assert np.array_equal(np.asarray(Image.open(out / "GT" / f"{sid}.png")), scene["GT"])
        assert np.array_equal(np.asarray(Image.open(out / "mask" / f"{sid}.png")), scene["mask"])


def test_generation_is_byte_identical(tmp_path):
    a = generate_demo_data(tmp_path / "a", n=3, seed=7, size=SIZE)
    b = generate_demo_data(tmp_path / "b", n=3, seed=7, size=SIZE)
    assert _files(a) == _files(b)
    for name in _files(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_scene_depends_on_seed_and_index_only():
    first = render_scene(11, 4, SIZE)
    render_scene(11, 0, SIZE)  # rendering another scene in between must not disturb the stream
    again = render_scene(11, 4, SIZE)
    assert np.array_equal(first["source"], again["source"])
    other_seed = render_scene(12, 4, SIZE)
    other_index = render_scene(11, 5, SIZE)
    assert not np.array_equal(first["source"], other_seed["source"])
    assert not np.array_equal(first["source"], other_index["source"])


def test_different_seeds_give_different_datasets(tmp_path):
    a = generate_demo_data(tmp_path / "a", n=2, seed=0, size=SIZE)
    b = generate_demo_data(tmp_path / "b", n=2, seed=1, size=SIZE)
    for name in ("source/scene_000000.png", "source/scene_000001.png"):
        assert (a / name).read_bytes() != (b / name).read_bytes()


def test_mask_is_binary_object_and_matches_coverage(scenes):
    for scene in scenes:
        mask, coverage = scene["mask"], scene["coverage"]
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert 0.002 < (mask > 0).mean() < 0.5
        assert np.array_equal(mask > 0, coverage >= 0.5)
        # Anti-aliased: the boundary carries fractional coverage for matting to recover.
        assert ((coverage > 0.05) & (coverage < 0.95)).sum() >= 10


def test_gt_equals_source_away_from_objects_and_shadows(scenes):
    for scene in scenes:
        away = ~_near_object_or_shadow(scene)
        assert away.mean() > 0.25
        assert np.array_equal(scene["source"][away], scene["GT"][away])


def test_shadow_darkens_and_touches_the_object(scenes):
    for scene in scenes:
        source, gt = scene["source"].astype(int), scene["GT"].astype(int)
        background = scene["coverage"] == 0
        # A shadow only ever removes light.
        assert (source[background] <= gt[background] + 1).all()
        dark = (scene["shadow"] > 0.25) & background
        assert dark.sum() >= 5, scene["caption"]
        assert source[dark].mean() < gt[dark].mean() - 10
        # Objects stand on the floor: their shadow starts at the object (contact).
        touching = (scene["shadow"] > 0.15) & (cv2.dilate(scene["mask"], np.ones((5, 5), np.uint8)) > 0) & ~(scene["mask"] > 0)
        assert touching.any(), scene["caption"]


def test_shadow_falls_away_from_the_light(scenes):
    checked = 0
    for scene in scenes:
        meta = scene["scene"]
        if len(meta["objects"]) != 1:
            continue
        cam, light, obj = meta["camera"], meta["light"], meta["objects"][0]
        ys, xs = np.nonzero((scene["shadow"] > 0.3) & (scene["mask"] == 0))
        floor = ys + 0.5 > cam["horizon"] + cam["focal"] * cam["height"] / (meta["wall_z"] or math.inf)
        ys, xs = ys[floor] + 0.5, xs[floor] + 0.5
        if ys.size < 10:
            continue
        # Back-project the shadow pixels onto the floor plane (the camera looks along +Z at height h).
        z = cam["focal"] * cam["height"] / (ys - cam["horizon"])
        x = (xs - cam["cx"]) * z / cam["focal"]
        offset = np.array([np.mean(x) - obj["x"], np.mean(z) - obj["z"]])
        away = -np.array([light[0], light[2]])
        assert offset @ away > 0, (scene["caption"], offset, away)
        checked += 1
    assert checked >= 3


def test_captions_describe_the_scene(scenes):
    for scene in scenes:
        caption = scene["caption"]
        for obj in scene["scene"]["objects"]:
            assert f"{obj['colour']} {obj['finish']} {obj['category']}" in caption
        assert caption.endswith(demo_scenes.GROUND_PHRASES[scene["scene"]["ground"]])
    assert len({s["scene"]["ground"] for s in scenes}) >= 3
    assert len({c for s in scenes for c in s["objects"]}) >= 4


def test_rerun_is_idempotent_and_new_parameters_rewrite(tmp_path):
    out = tmp_path / "demo"
    generate_demo_data(out, n=3, seed=2, size=SIZE)
    stamps = {name: (out / name).stat().st_mtime_ns for name in _files(out)}
    os.utime(out / "source" / "scene_000000.png", ns=(1, 1))  # a re-render would reset this
    generate_demo_data(out, n=3, seed=2, size=SIZE)
    assert (out / "source" / "scene_000000.png").stat().st_mtime_ns == 1
    assert (out / "meta.json").stat().st_mtime_ns == stamps["meta.json"]

    (out / "GT" / "scene_000001.png").unlink()  # a listed file gone: the folder is not complete
    generate_demo_data(out, n=3, seed=2, size=SIZE)
    assert (out / "GT" / "scene_000001.png").is_file()

    generate_demo_data(out, n=2, seed=9, size=SIZE)
    entries = json.loads((out / "meta.json").read_text())
    assert [e["id"] for e in entries] == ["scene_000000", "scene_000001"]
    assert not (out / "source" / "scene_000002.png").exists()  # stale scenes of the old run are gone
    assert np.array_equal(np.asarray(Image.open(out / "source" / "scene_000001.png")), render_scene(9, 1, SIZE)["source"])
    assert json.loads((out / "demo.json").read_text())["seed"] == 9


def test_interrupted_generation_leaves_no_partial_files_and_reruns(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    real = demo_scenes.render_scene

    def dies_at_two(seed, index, size):
        if index == 2:
            raise KeyboardInterrupt
        return real(seed, index, size)

    monkeypatch.setattr(demo_scenes, "render_scene", dies_at_two)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_data(out, n=3, seed=4, size=SIZE)
    assert not (out / "demo.json").exists() and not (out / "meta.json").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    monkeypatch.setattr(demo_scenes, "render_scene", real)
    generate_demo_data(out, n=3, seed=4, size=SIZE)
    assert len(json.loads((out / "meta.json").read_text())) == 3
    assert (out / "source" / "scene_000002.png").exists()


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_demo_data(tmp_path, n=-1)
    with pytest.raises(ValueError):
        render_scene(0, 0, size=16)


def test_cli_entry_point(tmp_path, capsys):
    assert demo_scenes.main([str(tmp_path / "cli"), "--n", "1", "--seed", "3", "--size", str(SIZE)]) == 0
    assert (tmp_path / "cli" / "source" / "scene_000000.png").exists()
    assert "1 demo scenes" in capsys.readouterr().out
