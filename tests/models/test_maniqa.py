
import numpy as np
import pytest
import torch

from layerloop.models.maniqa import (
    KONIQ_CONFIG,
    ManiqaNet,
    ManiqaScorer,
    crop_offsets,
    image_crops,
)


def _images(seed, shapes):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


# smaller than a crop (upscaled first), exactly a crop (also upscaled), larger than a crop, wide
SHAPES = [(50, 70), (64, 64), (90, 121), (70, 160)]


@pytest.fixture(scope="module")
def scorer():
    tiny = ManiqaScorer.tiny(seed=0)
    # Random heads put most patch scores below the final ReLU; lift them so scores differ between images.
    with torch.no_grad():
        tiny.net.fc_score[3].bias.fill_(0.5)
    return tiny


def test_tiny_scores_are_finite_float32_and_deterministic(scorer):
    images = _images(0, SHAPES)
    scores = scorer.score(images)
    assert scores.shape == (4,) and scores.dtype == np.float32
    assert np.isfinite(scores).all() and (scores >= 0).all()
    np.testing.assert_array_equal(scorer.score(images), scores)
    assert len(set(scores.tolist())) == 4  # the score depends on the image
    fresh = ManiqaScorer.tiny(seed=0).score(images)
    np.testing.assert_array_equal(ManiqaScorer.tiny(seed=0).score(images), fresh)
    assert not np.allclose(ManiqaScorer.tiny(seed=1).score(images), fresh)
    assert scorer.score([]).shape == (0,)


def test_batched_equals_one_by_one(scorer):
    images = _images(1, SHAPES)
    batched = scorer.score(images, batch_size=3)
    single = np.concatenate([scorer.score([image]) for image in images])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)


def test_score_is_the_weighted_patch_average_over_all_crops(scorer):
    image = _images(2, [(90, 121)])[0]
    crops = image_crops(image, 64, 4)
    assert crops.shape == (4, 3, 64, 64)
    with torch.no_grad():
        patch_scores, weights = scorer.net(crops)
    assert patch_scores.shape == weights.shape == (4, 64)
    assert ((weights > 0) & (weights < 1)).all()
    expected = (patch_scores * weights).sum() / weights.sum()
    np.testing.assert_allclose(scorer.score([image]), [expected.item()], rtol=1e-5)


def test_crop_grid():
    assert crop_offsets(10, 12, 4, 4) == [(0, 0), (0, 4), (3, 0), (3, 4)]
    # the published setting: 20 crops of 224 on a 5x5 grid with steps (side - 224) // 4, first 20
    offsets = crop_offsets(300, 400, 224, 20)
    assert len(offsets) == 20 and offsets[:6] == [(0, 0), (0, 44), (0, 88), (0, 132), (0, 176), (19, 0)]
    assert offsets[-1] == (57, 176)
    for h, w in [(225, 225), (230, 999), (1000, 300)]:
        assert all(0 <= top <= h - 224 and 0 <= left <= w - 224 for top, left in crop_offsets(h, w, 224, 20))
    # an image with a side <= the crop size is upscaled by (size + 1) / shorter side before cropping
    small = image_crops(np.zeros((50, 70, 3), np.uint8), 64, 4)
    assert small.shape == (4, 3, 64, 64) and torch.allclose(small, torch.full_like(small, -1.0))


def test_shifted_window_mask(scorer):
    stage = scorer.net.swintransformer1.layers[0]
    assert stage.blocks[0].attn_mask is None and stage.blocks[0].shift == 0
    mask = stage.blocks[1].attn_mask  # 8x8 grid, windows of 4, shift 2: four windows
    assert mask.shape == (4, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert (mask[0] == 0).all() and (mask[3] != 0).any()








def test_real_architecture_matches_the_published_checkpoint_keys():
    # Names and shapes of pyiqa's MANIQA (koniq); built on the meta device, so nothing is allocated.
    with torch.device("meta"):
        state = ManiqaNet(KONIQ_CONFIG).state_dict()
    expected = {
        "vit.patch_embed.proj.weight": (768, 3, 8, 8),
        "vit.pos_embed": (1, 785, 768),
        "vit.blocks.11.mlp.fc2.weight": (768, 3072),
        "vit.head.weight": (1000, 768),
        "tablock1.0.c_q.weight": (784, 784),
        "tablock2.1.c_v.bias": (784,),
        "conv1.weight": (768, 3072, 1, 1),
        "conv2.weight": (384, 768, 1, 1),
        "swintransformer1.downsample.weight": (768, 768, 3, 3),
        "swintransformer1.layers.0.conv.weight": (768, 768, 3, 3),
        "swintransformer1.layers.1.blocks.0.attn.relative_position_bias_table": (49, 4),
        "swintransformer1.layers.0.blocks.0.attn.relative_position_index": (16, 16),
        "swintransformer1.layers.0.blocks.1.attn_mask": (49, 16, 16),
        "swintransformer2.layers.0.blocks.0.mlp.fc1.weight": (768, 384),
        "swintransformer2.layers.1.blocks.1.attn.qkv.weight": (1152, 384),
        "fc_score.0.weight": (384, 384),
        "fc_score.3.weight": (1, 384),
        "fc_weight.3.bias": (1,),
    }
    assert {name: tuple(state[name].shape) for name in expected if name in state} == expected
    assert "swintransformer1.layers.0.blocks.0.attn_mask" not in state  # unshifted blocks have no mask
    # ViT-B/8 152 + 4 TABs x 6 + two 1x1 convs 4 + two Swin stages x 64 + two heads x 4
    assert len(state) == 316
