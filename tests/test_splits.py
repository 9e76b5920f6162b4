"""Leak-free splits: no pixel of a training patch lies in the test area or its buffer."""

import numpy as np
import pytest

from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.training.data import load_pair
from alphaearth_height.training.splits import AreaLayout, SplitSpec, make_areas
from alphaearth_height.training.train import TrainConfig, _Trainer

SPECS = [SplitSpec("contiguous", direction=d, buffer=4) for d in ("east", "west", "north", "south")] + [
    SplitSpec("blocks", block_size=24, buffer=3, seed=s) for s in (0, 1)]


def near(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` of the mask, by brute force (independent of the code under test)."""
    out = np.zeros_like(mask)
    for r, c in np.argwhere(mask):
        out[max(r - radius, 0):r + radius + 1, max(c - radius, 0):c + radius + 1] = True
    return out


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.direction if s.kind == 'contiguous' else s.seed}")
def test_no_training_patch_touches_the_test_area_or_its_buffer(spec):
    areas = make_areas(spec, 200, 240)
    assert areas.train.any() and areas.validation.any() and areas.test.any()
    assert not (areas.train & areas.test).any() and not (areas.train & areas.validation).any()
    assert not (areas.validation & areas.test).any()
    forbidden = near(areas.test, spec.buffer) | near(areas.validation, spec.buffer)
    assert not (areas.train & forbidden).any()


@pytest.mark.parametrize("spec", SPECS + [SplitSpec(validation_window=[10, 20, 30, 40], buffer=2),
                                          SplitSpec(test_fraction=0.0, buffer=3)], ids=str)
def test_a_window_of_the_layout_is_that_window_of_the_whole_scenes_areas(spec):
    """Training reads areas window by window: each must equal the crop of the whole-scene masks
    (buffers reach across window edges), and parts outside the scene belong to no area."""
    layout = AreaLayout(spec, 200, 240)
    whole = layout.areas()
    rng = np.random.default_rng(0)
    for _ in range(40):
        row, col = (int(v) for v in rng.integers(-20, (200, 240)))
        height, width = (int(v) for v in rng.integers(1, 70, 2))
        window = layout.areas(row, col, height, width)
        for name in ("train", "validation", "test"):
            padded = np.zeros((200 + 200, 240 + 200), dtype=bool)
            padded[100:300, 100:340] = getattr(whole, name)
            expected = padded[row + 100:row + 100 + height, col + 100:col + 100 + width]
            assert (getattr(window, name) == expected).all(), (name, row, col, height, width)


def test_blocks_follow_the_fractions_and_the_seed():
    spec = SplitSpec("blocks", test_fraction=0.3, validation_fraction=0.1, block_size=10)
    areas = make_areas(spec, 100, 100)
    assert areas.test.sum() == 30 * 100 and areas.validation.sum() == 10 * 100
    again = make_areas(spec, 100, 100)
    other = make_areas(SplitSpec("blocks", block_size=10, seed=5), 100, 100)
    assert (again.test == areas.test).all() and not (other.test == areas.test).all()


def test_a_validation_window_replaces_the_validation_strip():
    areas = make_areas(SplitSpec(validation_window=[10, 20, 30, 40], buffer=2), 100, 200)
    assert areas.validation.sum() == 30 * 40 and areas.validation[20:60, 10:40].all()
    assert not areas.train[18:62, 8:42].any()
    with pytest.raises(InputError, match="is not inside"):
        make_areas(SplitSpec(validation_window=[190, 0, 30, 10]), 100, 200)


def test_the_sampler_draws_only_leak_free_patches_of_a_real_scene(small_scene):
    config = TrainConfig(embeddings=str(small_scene.embeddings), reference=str(small_scene.reference), out="unused",
                         arch="unet", encoder_depth=3, decoder_channels=[16, 16, 8], patch_size=32,
                         split=SplitSpec("blocks", block_size=64, buffer=6), device="cpu")
    trainer = _Trainer(config, log=lambda m: None, progress=None)
    areas = trainer.scenes[0].layout.areas()
    pair = load_pair(small_scene.embeddings, small_scene.reference)
    forbidden = near(areas.test, 6)
    drawn = trainer.sampler.draw(np.random.default_rng(0), 400)
    for _, r, c in drawn:
        assert not forbidden[r:r + 32, c:c + 32].any() and areas.train[r:r + 32, c:c + 32].all()
        assert pair.label_mask[r:r + 32, c:c + 32].mean() >= 0.5
    for k, r, c in drawn[:16]:
        x, y, m = trainer.dataset[(k, r, c, "train")]
        labelled = pair.label_mask[r:r + 32, c:c + 32]
        assert (m.numpy() == labelled).all() and np.isfinite(x.numpy()).all() and np.isfinite(y.numpy()).all()
        assert np.allclose(x.numpy(), np.nan_to_num(pair.embeddings[:, r:r + 32, c:c + 32]))
        assert np.allclose(y.numpy()[labelled] * trainer.std + trainer.mean,
                           pair.reference[r:r + 32, c:c + 32][labelled], atol=1e-3)
    trainer.close()


def test_balanced_sampling_evens_out_height_ranges(small_scene):
    def mean_heights(balance: bool) -> np.ndarray:
        config = TrainConfig(embeddings=str(small_scene.embeddings), reference=str(small_scene.reference),
                             out="unused", arch="unet", encoder_depth=3, decoder_channels=[16, 16, 8], patch_size=32,
                             balance=balance, device="cpu")
        trainer = _Trainer(config, log=lambda m: None, progress=None)
        trainer.close()
        drawn = trainer.sampler.draw(np.random.default_rng(0), 3000)
        return np.array([np.nanmean(reference[r:r + 32, c:c + 32]) for _, r, c in drawn])

    reference = load_pair(small_scene.embeddings, small_scene.reference).reference

    plain, balanced = mean_heights(False), mean_heights(True)
    edges = np.linspace(min(plain.min(), balanced.min()), max(plain.max(), balanced.max()), 9)
    spread = [np.histogram(h, edges)[0].std() / len(h) for h in (plain, balanced)]
    assert spread[1] < 0.7 * spread[0]
