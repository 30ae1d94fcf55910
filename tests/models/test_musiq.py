
import numpy as np
import pytest
import torch

from layerloop.models.musiq import (
    KONIQ_CONFIG,
    MusiqNet,
    MusiqScorer,
    multiscale_tokens,
)


def _images(seed, shapes):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


# a portrait, a wide one, one smaller than a patch, one whose sides are whole patches
SHAPES = [(40, 28), (20, 70), (9, 12), (32, 48)]


@pytest.fixture(scope="module")
def scorer():
    return MusiqScorer.tiny(seed=0)


def test_tiny_scores_are_finite_float32_and_deterministic(scorer):
    images = _images(0, SHAPES)
    scores = scorer.score(images)
    assert scores.shape == (4,) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    np.testing.assert_array_equal(scorer.score(images), scores)
    np.testing.assert_array_equal(MusiqScorer.tiny(seed=0).score(images), scores)
    assert len(set(scores.tolist())) == 4  # the score depends on the image
    assert not np.allclose(MusiqScorer.tiny(seed=1).score(images), scores)
    assert scorer.score([]).shape == (0,)


def test_batched_equals_one_by_one(scorer):
    # Images of different sizes are padded to one sequence length with masked tokens.
    images = _images(1, SHAPES)
    batched = scorer.score(images, batch_size=3)
    single = np.concatenate([scorer.score([image]) for image in images])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)


def test_masked_tokens_do_not_change_the_score(scorer):
    # Dropping every padding token from the sequence must give the same score: masks work.
    image = _images(2, [(20, 70)])[0]
    patches, spatial, scale, mask = multiscale_tokens(torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1,
                                                      scorer.config)
    assert not mask.all()
    with torch.no_grad():
        kept = scorer.net(patches[mask][None], spatial[mask][None], scale[mask][None], mask[mask][None])
    np.testing.assert_allclose(scorer.score([image]), kept.numpy(), rtol=1e-5, atol=1e-5)


def test_token_layout_of_the_koniq_model():
    image = torch.zeros(3, 300, 200)
    patches, spatial, scale, mask = multiscale_tokens(image, KONIQ_CONFIG)
    # longer side 224: 224x149 -> 7x5 patches in 7^2 slots; 384: 384x256 -> 12x8 in 12^2; original: 10x7, all kept
    assert patches.shape == (49 + 144 + 70, 3, 32, 32)
    assert mask[:49].sum() == 35 and mask[49:193].sum() == 96 and mask[193:].all()
    assert set(scale[mask].tolist()) == {0, 1, 2} and (scale[193:] == 2).all()
    assert spatial.min() >= 0 and spatial.max() < 100
    # 10 rows on a 10x10 hash grid map one to one; 7 columns spread over the grid's 10 columns
    original = spatial[193:].view(10, 7)
    assert (original[:, 0] // 10).tolist() == list(range(10))
    assert (original[0] % 10).tolist() == [0, 1, 2, 4, 5, 7, 8]








def test_real_architecture_matches_the_published_checkpoint_keys():
    # Names and shapes of pyiqa's MUSIQ (koniq10k); built on the meta device, so nothing is allocated.
    with torch.device("meta"):
        state = MusiqNet(KONIQ_CONFIG).state_dict()
    expected = {
        "conv_root.weight": (64, 3, 7, 7),
        "gn_root.bias": (64,),
        "block1.conv2.weight": (64, 64, 3, 3),
        "block1.conv_proj.weight": (256, 64, 1, 1),
        "block1.gn_proj.weight": (256,),
        "embedding.weight": (384, 16384),
        "transformer_encoder.posembed_input.position_emb": (1, 100, 384),
        "transformer_encoder.scaleembed_input.scale_emb": (3, 384),
        "transformer_encoder.cls": (1, 1, 384),
        "transformer_encoder.transformer.encoderblock_13.attention.query.weight": (384, 384),
        "transformer_encoder.transformer.encoderblock_13.attention.out.bias": (384,),
        "transformer_encoder.transformer.encoderblock_0.mlp.fc1.weight": (1152, 384),
        "transformer_encoder.encoder_norm.weight": (384,),
        "head.weight": (1, 384),
    }
    assert {name: tuple(state[name].shape) for name in expected if name in state} == expected
    # stem 3 + bottleneck 12 + embedding 2 + encoder 5 + 14 blocks x 16 + head 2
    assert len(state) == 248
    assert "transformer_encoder.transformer.encoderblock_14.norm1.weight" not in state
