"""Layered PSD export (layerloop/export.py) read back by independent readers: Pillow's PSD plugin (which takes a
layer's channels in file order) and psd-tools' reader (by channel id); and the two commands that write PSDs,
``layerloop export-layers`` and ``layerloop layers``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layerloop import errors
from layerloop.cli import main
from layerloop.datasets.shards import ShardWriter
from layerloop.export import alpha_bbox, layer_name, parse_layer_spec, write_psd
from layerloop.samples import LayeredSample, composite
from tests.test_cli_imports import imported_by
from tests.models.test_bfs import _randomise_trainables  # the same coupled tiny LoRA + g


def pillow_layers(path: Path) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int], np.ndarray]]]:
    """(merged RGB image, [(name, bbox, full-canvas RGBA pixels, valid inside bbox)]) as Pillow reads them.
    Pillow starts at frame 1 with the merged image loaded, so the layers are visited last to first."""
    with Image.open(path) as image:
        assert image.format == "PSD"
        merged = np.asarray(image.convert("RGB"))
        info = [(name, bbox) for name, _, bbox, _ in image.layers]
        pixels = {}
        for frame in range(len(info), 0, -1):
            image.seek(frame)
            pixels[frame] = np.asarray(image.convert("RGBA"))
    return merged, [(name, bbox, pixels[i + 1]) for i, (name, bbox) in enumerate(info)]


def _random_layer(rng, height, width, box):
    layer = np.zeros((height, width, 4), np.uint8)
    x0, y0, x1, y1 = box
    layer[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 4), dtype=np.uint8)
    layer[y0, x0:x1, 3] = 255  # the box's own edges carry alpha, so the bbox is the box
    layer[y0:y1, x0, 3] = 255
    layer[y1 - 1, x0:x1, 3] = 255
    layer[y0:y1, x1 - 1, 3] = 255
    return layer


def test_psd_layers_read_back_exactly_with_pillow_and_psd_tools(tmp_path):
    from psd_tools import PSDImage

    rng = np.random.default_rng(0)
    height, width = 20, 30
    background = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    layers = [("a tree", _random_layer(rng, height, width, (7, 5, 30, 20))),
              ("a cat", _random_layer(rng, height, width, (0, 0, 11, 9))),
              ("nothing", np.zeros((height, width, 4), np.uint8))]
    path = write_psd(tmp_path / "out.psd", background, layers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.psd"]  # written under a temporary name, renamed

    merged, read = pillow_layers(path)
    assert [(name, bbox) for name, bbox, _ in read] == [("background", (0, 0, width, height)),
                                                       ("a tree", (7, 5, 30, 20)), ("a cat", (0, 0, 11, 9)),
                                                       ("nothing", (0, 0, width, height))]
    assert np.array_equal(read[0][2][..., :3], background) and (read[0][2][..., 3] == 255).all()
    for (_, bbox, pixels), (_, layer) in zip(read[1:], layers):
        x0, y0, x1, y1 = bbox
        # RGB and alpha, lossless. (Outside its box Pillow leaves whatever the frame read before left there.)
        assert np.array_equal(pixels[y0:y1, x0:x1], layer[y0:y1, x0:x1])
        assert bbox == (alpha_bbox(layer) or (0, 0, width, height))  # everything outside is transparent
    flattened = background
    for _, layer in layers:
        flattened = composite(layer, flattened)
    assert np.abs(merged.astype(int) - flattened).max() <= 1  # psd-tools composites once, we round per layer

    document = PSDImage.open(path)  # a reader that goes by channel id
    assert [(layer.name, layer.bbox, layer.kind) for layer in document] == [
        ("background", (0, 0, width, height), "pixel"), ("a tree", (7, 5, 30, 20), "pixel"),
        ("a cat", (0, 0, 11, 9), "pixel"), ("nothing", (0, 0, width, height), "pixel")]
    x0, y0, x1, y1 = 7, 5, 30, 20
    assert np.array_equal(np.asarray(document[1].topil()), layers[0][1][y0:y1, x0:x1])


def test_single_layer_merged_image_is_the_composite_and_names_keep_unicode(tmp_path):
    from psd_tools import PSDImage

    rng = np.random.default_rng(1)
    background = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    layer = _random_layer(rng, 8, 12, (2, 1, 9, 7))
    path = write_psd(tmp_path / "one.psd", background, [("café ☕", layer)], background_name="plate")
    merged, read = pillow_layers(path)
    assert np.array_equal(merged, composite(layer, background))
    assert [name for name, _, _ in read] == ["plate", "?"]  # Pillow reads the legacy MacRoman name only
    assert [layer.name for layer in PSDImage.open(path)] == ["plate", "café ☕"]


def test_write_psd_refuses_layers_of_another_size(tmp_path):
    with pytest.raises(ValueError, match="layer 1 .'big'. is"):
        write_psd(tmp_path / "x.psd", np.zeros((8, 8, 3), np.uint8), [("big", np.zeros((9, 8, 4), np.uint8))])
    assert not list(tmp_path.iterdir())


def test_helpers():
    assert alpha_bbox(np.zeros((4, 4, 4), np.uint8)) is None
    assert layer_name("  a\nred   box ", "x") == "a red box" and layer_name("", "foreground") == "foreground"
    assert len(layer_name("word " * 40, "x")) == 80
    assert parse_layer_spec("1,2,30,40=a red box = big") == ((1, 2, 30, 40), "a red box = big")
    for bad in ("1,2,3=x", "a,b,c,d=x", "1,2,3,4"):
        with pytest.raises(ValueError, match="x0,y0,x1,y1=caption"):
            parse_layer_spec(bad)


# ----------------------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    out.mkdir()
    rng = np.random.default_rng(2)
    samples = []
    for i in range(2):
        background = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
        foreground = _random_layer(rng, 16, 24, (4 + i, 3, 14, 12))
        samples.append(LayeredSample(key=f"demo_{i}", composite=composite(foreground, background),
                                     background=background, foreground=foreground,
                                     mask=np.full((16, 24), 255, np.uint8), caption=f"a square {i}"))
    ShardWriter(out, "demo").write(0, samples)
    (out / "run.json").write_text(json.dumps({"name": "demo", "status": "complete", "shards": 1, "seed": 0}))
    return out


def test_export_layers_writes_a_stored_sample(run_dir, tmp_path, capsys):
    from layerloop.datasets.shards import read_samples

    stored = {s.key: s for s in read_samples(run_dir)}["demo_1"]
    out = tmp_path / "demo_1.psd"
    assert main(["export-layers", str(run_dir), "--key", "demo_1", "--out", str(out)]) == 0
    assert "background + 1 layer(s)" in capsys.readouterr().out
    merged, read = pillow_layers(out)
    assert [name for name, _, _ in read] == ["background", "a square 1"]
    assert np.array_equal(read[0][2][..., :3], stored.background)
    x0, y0, x1, y1 = read[1][1]
    assert (x0, y0, x1, y1) == alpha_bbox(stored.foreground) == (5, 3, 14, 12)
    assert np.array_equal(read[1][2][y0:y1, x0:x1], stored.foreground[y0:y1, x0:x1])
    assert np.array_equal(merged, stored.composite)  # a quadruple: C = a F + (1 - a) B, exactly


def test_export_layers_of_an_unknown_key_is_refused(run_dir, tmp_path, capsys):
    code = main(["export-layers", str(run_dir), "--key", "nope", "--out", str(tmp_path / "x.psd")])
    assert code == errors.EXIT_REFUSED and "'nope' is not in" in capsys.readouterr().err
    assert not (tmp_path / "x.psd").exists()


def test_new_commands_help_imports_no_heavy_library():
    for argv in (["export-layers", "--help"], ["layers", "--help"]):
        assert imported_by(*argv) == {"code": 0, "imported": []}, argv


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from layerloop.models import bfs

    models = bfs.tiny(0)
    _randomise_trainables(models.generator, seed=3, scale=0.05)
    path = tmp_path_factory.mktemp("layers_ckpt") / "ckpt"
    models.generator.save_lora(path)
    return path


def test_layers_command_writes_a_layered_psd_and_pngs(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (18, 16, 3), dtype=np.uint8)).save(tmp_path / "bg.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    out = tmp_path / "scene.psd"
    argv = ["layers", str(checkpoint), "--background", str(tmp_path / "bg.png"), "--layer", "0,0,8,8=a tree",
            "--layer", "4,4,16,12=a cat", "--steps", "1", "--seed", "7", "--device", "cpu", "--out", str(out), "--png"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "cropped from 16x18 to 16x16" in captured.err and "background + 2 layer(s)" in captured.out
    merged, read = pillow_layers(out)
    assert [name for name, _, _ in read] == ["background", "1: a tree", "2: a cat"]
    background = np.asarray(Image.open(tmp_path / "scene.background.png"))
    assert np.array_equal(background, np.asarray(Image.open(tmp_path / "bg.png"))[:16])
    assert np.array_equal(read[0][2][..., :3], background)
    flattened = background
    for i, (_, (x0, y0, x1, y1), pixels) in enumerate(read[1:], start=1):
        png = np.asarray(Image.open(tmp_path / f"scene.layer-{i}.png"))
        assert np.array_equal(pixels[y0:y1, x0:x1], png[y0:y1, x0:x1])
        flattened = composite(png, flattened)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "scene.composite.png")), flattened)
    assert np.abs(merged.astype(int) - flattened).max() <= 1
    first = out.read_bytes()
    assert main(argv) == 0 and out.read_bytes() == first  # the same seed, the same file
    # a reference image through a tiny random Redux changes the layers
    assert main([*argv[:-1], "--reference", str(tmp_path / "ref.png"), "--redux-model", "tiny"]) == 0
    assert out.read_bytes() != first


def test_layers_command_refuses_a_box_outside_the_background(checkpoint, tmp_path, capsys):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "bg.png")
    code = main(["layers", str(checkpoint), "--background", str(tmp_path / "bg.png"), "--layer", "0,0,20,8=x",
                 "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "x.psd")])
    assert code == errors.EXIT_REFUSED and "layer 1: box (0, 0, 20, 8)" in capsys.readouterr().err
    assert not (tmp_path / "x.psd").exists()
