"""Leak-free splits: no pixel of a training patch lies in the test area or its buffer."""

import numpy as np
import pytest

from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.training.patches import batch
from alphaearth_height.training.splits import SplitSpec, make_areas, patch_origins
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
    origins = patch_origins(areas.train, 16)
    assert len(origins) > 0
    for r, c in origins:
        assert not forbidden[r:r + 16, c:c + 16].any()
        assert areas.train[r:r + 16, c:c + 16].all()


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
    scene = trainer.scenes[0]
    forbidden = near(scene.areas.test, 6)
    drawn = trainer.sampler.draw(np.random.default_rng(0), 400)
    for _, r, c in drawn:
        assert not forbidden[r:r + 32, c:c + 32].any()
    x, y, m = batch(trainer.scenes, drawn[:16], 32, trainer.mean, trainer.std)
    labelled = np.stack([scene.label[r:r + 32, c:c + 32] for _, r, c in drawn[:16]])
    assert (m.numpy() == labelled).all() and np.isfinite(x.numpy()).all() and np.isfinite(y.numpy()).all()
    holes = ~np.stack([scene.pair.label_mask[r:r + 32, c:c + 32] for _, r, c in drawn[:16]])
    assert not m.numpy()[holes].any()  # nodata in embeddings or reference never enters the loss


def test_balanced_sampling_evens_out_height_ranges(small_scene):
    def mean_heights(balance: bool) -> np.ndarray:
        config = TrainConfig(embeddings=str(small_scene.embeddings), reference=str(small_scene.reference),
                             out="unused", arch="unet", encoder_depth=3, decoder_channels=[16, 16, 8], patch_size=32,
                             balance=balance, device="cpu")
        trainer = _Trainer(config, log=lambda m: None, progress=None)
        scene = trainer.scenes[0]
        drawn = trainer.sampler.draw(np.random.default_rng(0), 3000)
        return np.array([np.nanmean(scene.target[r:r + 32, c:c + 32]) for _, r, c in drawn])

    plain, balanced = mean_heights(False), mean_heights(True)
    edges = np.linspace(min(plain.min(), balanced.min()), max(plain.max(), balanced.max()), 9)
    spread = [np.histogram(h, edges)[0].std() / len(h) for h in (plain, balanced)]
    assert spread[1] < 0.7 * spread[0]
