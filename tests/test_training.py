import csv
from dataclasses import asdict
import json

import numpy as np
import pytest
import torch

from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.inference import predict_height
from alphaearth_height.plugin.core.models import load_model
from alphaearth_height.training.data import contiguous_split
from alphaearth_height.training.splits import SplitSpec
from alphaearth_height.training.train import TrainConfig, _stored_config, masked_loss, train_model


@pytest.mark.parametrize("direction", ["east", "west", "north", "south"])
def test_contiguous_split_never_overlaps_and_covers_the_scene(direction):
    split = contiguous_split(300, 200, 0.3, 0.1, direction)
    cover = np.zeros((200, 300), dtype=int)
    for w in (split.train, split.validation, split.test):
        cover[w.toslices()] += 1
    assert (cover == 1).all()
    along = 300 if direction in ("east", "west") else 200
    size = split.test.width if direction in ("east", "west") else split.test.height
    assert size == round(along * 0.3)
    edge = {"east": split.test.col_off + split.test.width == 300, "west": split.test.col_off == 0,
            "south": split.test.row_off + split.test.height == 200, "north": split.test.row_off == 0}
    assert edge[direction]


def test_bad_split_fractions_are_refused():
    with pytest.raises(InputError, match="sum to less than 1"):
        contiguous_split(300, 200, 0.8, 0.3)


def test_nodata_pixels_do_not_enter_the_loss():
    pred = torch.zeros(1, 4, 4)
    target = torch.ones(1, 4, 4)
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    target[0, 0, 0] = 1e6
    mask[0, 0, 0] = False
    assert masked_loss(pred, target, mask).item() == pytest.approx(1.0)
    assert masked_loss(pred, target, torch.zeros_like(mask)).item() == 0.0


def test_short_training_writes_a_package_that_predicts(small_scene, tmp_path):
    config = TrainConfig(embeddings=str(small_scene.embeddings), reference=str(small_scene.reference),
                         out=str(tmp_path / "run"), arch="unet", encoder_depth=3, decoder_channels=[16, 16, 8],
                         patch_size=64, batch_size=4, epochs=3, steps_per_epoch=4, device="cpu", tile=64,
                         overlap=16, region="test scene", year=2020)
    logs = []
    result = train_model(config, log=logs.append)
    assert any(line.startswith("epoch   1/3") for line in logs) and "ETA" in logs[1]
    folder = result.model_dir
    card = json.loads((folder / "model.json").read_text())
    assert card["training"]["split"]["direction"] == "east" and card["training"]["region"] == "test scene"
    assert set(card["metrics"]) == {"train", "test"} and card["metrics"]["test"]["n"] > 0
    rows = list(csv.DictReader(open(folder / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    package = load_model(folder)
    out = predict_height(small_scene.embeddings, package, tmp_path / "h.tif", device="cpu")
    assert out.stats["valid_pixels"] > 0
    with pytest.raises(InputError, match="already exists and is not empty"):
        train_model(config, log=logs.append)


from safetensors.torch import load_file  # noqa: E402

from alphaearth_height.training.train import resume_training  # noqa: E402

TINY = dict(arch="unet", encoder_depth=3, decoder_channels=[16, 16, 8], patch_size=64, device="cpu", tile=64,
            overlap=16)


@pytest.fixture(scope="module")
def trained(small_scene, tmp_path_factory):
    """A short but real training run on the 256 x 256 demo scene (contiguous split, east)."""
    config = TrainConfig(embeddings=str(small_scene.embeddings), reference=str(small_scene.reference),
                         out=str(tmp_path_factory.mktemp("trained") / "run"), batch_size=8, epochs=4,
                         steps_per_epoch=12, lr=3e-3, **TINY)
    return train_model(config, log=lambda message: None)


def test_short_training_lowers_validation_loss_and_beats_ridge_on_the_test_area(trained):
    best = min(row["val_loss"] for row in trained.history)
    assert best < 0.5 * trained.initial_val_loss
    report = json.loads((trained.model_dir / "evaluation" / "report.json").read_text())
    for area in ("validation", "test"):
        net, ridge = report["areas"][area]["model"], report["areas"][area]["ridge"]
        assert net["n"] == ridge["n"] > 0
        assert net["rmse"] < ridge["rmse"] and net["r2"] > ridge["r2"], area
    card = load_model(trained.model_dir).card
    assert card["metrics"]["test"]["rmse"] == pytest.approx(report["areas"]["test"]["model"]["rmse"])


def test_the_run_folder_holds_package_config_history_and_report(trained):
    names = {p.name for p in trained.model_dir.iterdir()}
    assert {"model.json", "model.safetensors", "config.json", "history.csv", "evaluation"} <= names
    assert "checkpoint" not in names  # a finished run needs no resume state unless asked to keep it
    config = json.loads((trained.model_dir / "config.json").read_text())
    assert config["epochs"] == 4 and config["split"]["kind"] == "contiguous"


def test_a_run_written_with_the_split_fields_flat_still_reads(small_scene, tmp_path):
    """config.json of runs from before TrainConfig.split was nested: --resume must still read it."""
    nested = _config(small_scene, tmp_path / "run", split=SplitSpec("blocks", 0.25, 0.15, "west", 64, 3, seed=7,
                                                                     validation_window=[0, 0, 40, 40]), seed=7)
    flat = {k: v for k, v in asdict(nested).items() if k != "split"}
    flat.update(split="blocks", test_fraction=0.25, validation_fraction=0.15, direction="west", block_size=64,
                buffer=3, validation_window=[0, 0, 40, 40])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(flat))
    assert _stored_config(tmp_path / "run") == nested
    assert TrainConfig.from_dict(json.loads(json.dumps(asdict(nested)))) == nested  # the current form


def _config(scene, out, **changes) -> TrainConfig:
    values = dict(embeddings=str(scene.embeddings), reference=str(scene.reference), out=str(out), batch_size=2,
                  epochs=3, steps_per_epoch=3, keep_checkpoint=True, **TINY)
    values.update(changes)
    return TrainConfig(**values)


def test_resume_after_an_interruption_gives_the_uninterrupted_result(small_scene, tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        whole = train_model(_config(small_scene, tmp_path / "whole", schedule="plateau"), log=lambda m: None)

        def interrupt_after_epoch_2(message: str) -> None:
            if message.startswith("epoch   2/"):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            train_model(_config(small_scene, tmp_path / "cut", schedule="plateau"), log=interrupt_after_epoch_2)
        assert not (tmp_path / "cut" / "model.json").exists()
        assert (tmp_path / "cut" / "checkpoint" / "state.safetensors").is_file()
        resumed = resume_training(tmp_path / "cut", log=lambda m: None)
    finally:
        torch.use_deterministic_algorithms(False)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in whole.history]
    a = load_file(str(whole.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(InputError, match="finished run"):
        resume_training(tmp_path / "cut", log=lambda m: None)


def test_a_bad_option_is_refused_before_anything_is_written(small_scene, tmp_path):
    with pytest.raises(InputError, match="loss 'cubic'"):
        train_model(_config(small_scene, tmp_path / "run", loss="cubic"), log=lambda m: None)
    with pytest.raises(InputError, match="patch size 512"):
        train_model(_config(small_scene, tmp_path / "run", patch_size=512), log=lambda m: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("loss", ["huber", "l1"])
def test_other_losses_ignore_nodata_too(loss):
    pred = torch.zeros(1, 3, 3)
    target = torch.full((1, 3, 3), 2.0)
    mask = torch.ones(1, 3, 3, dtype=torch.bool)
    clean = masked_loss(pred, target, mask, loss).item()
    target[0, 1, 1], mask[0, 1, 1] = 1e9, False
    assert masked_loss(pred, target, mask, loss).item() == pytest.approx(clean)


def test_no_test_area_trains_on_all_but_validation_and_a_time_limit_keeps_the_best_epoch(small_scene, tmp_path):
    """--test-fraction 0 (the user tests elsewhere): no test metrics anywhere, and --max-minutes stops
    after the first epoch (a limit no epoch can meet), still writing a complete package."""
    config = TrainConfig(embeddings=str(small_scene.embeddings), reference=str(small_scene.reference),
                         out=str(tmp_path / "run"), batch_size=2, epochs=3, steps_per_epoch=2, max_minutes=1e-6,
                         split=SplitSpec(test_fraction=0.0), calibrate=False, **TINY)
    logs = []
    result = train_model(config, log=logs.append)
    assert len(result.history) == 1 and any(line.startswith("time limit") for line in logs)
    card = json.loads((result.model_dir / "model.json").read_text())
    assert set(card["metrics"]) == {"train", "validation"} and card["metrics"]["validation"]["n"] > 0
    pixels = card["training"]["split"]["pixels"]
    assert pixels["test"] == 0 and pixels["train"] + pixels["validation"] == 256 * 256
    report = json.loads((result.model_dir / "evaluation" / "report.json").read_text())
    assert "test" not in report["areas"] and not any(p.startswith("test_") for p in report["plots"])
    assert "no test area" in logs[-1]


def test_reading_workers_change_nothing_but_who_reads(small_scene):
    """The patches are drawn in the training process, so 2 DataLoader workers read exactly the
    batches that the training process reads itself."""
    from alphaearth_height.training.train import _Trainer

    def epoch(workers: int) -> list:
        config = TrainConfig(embeddings=str(small_scene.embeddings), reference=str(small_scene.reference),
                             out="unused", batch_size=3, steps_per_epoch=4, workers=workers, seed=7, **TINY)
        trainer = _Trainer(config, log=lambda m: None, progress=None)
        trainer.draw_epoch()
        batches = [tuple(t.numpy() for t in batch) for batch in trainer.loader]
        trainer.close()
        return batches

    alone, shared = epoch(0), epoch(2)
    assert len(alone) == len(shared) == 4
    for a, b in zip(alone, shared):
        assert all(np.array_equal(x, y) for x, y in zip(a, b)) and a[2].any()
