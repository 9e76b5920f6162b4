import csv
import json

import numpy as np
import pytest
import torch

from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.inference import predict_height
from alphaearth_height.plugin.core.models import load_model
from alphaearth_height.training.data import contiguous_split
from alphaearth_height.training.train import TrainConfig, masked_loss, train_model


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
