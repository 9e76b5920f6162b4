import json
import shutil

import numpy as np
import pytest
import torch

from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.models import (architecture_config, build_model, bundled_model_dir,
                                                  load_model, make_card, save_model)


def test_round_trip_gives_the_same_network(tiny_model):
    package = load_model(tiny_model)
    again = load_model(tiny_model)
    x = torch.randn(1, 64, 32, 32)
    with torch.no_grad():
        np.testing.assert_array_equal(package.module(x).numpy(), again.module(x).numpy())
    card = json.loads((tiny_model / "model.json").read_text())
    assert card["model"]["architecture"] == "unet" and card["model"]["in_channels"] == 64
    assert card["weights"]["parameters"] == sum(p.numel() for p in package.module.state_dict().values())
    assert set(card["software"]) == {"alphaearth_height", "torch", "segmentation_models_pytorch"}
    assert package.multiple == 8 and package.default("tile", 0) == 64


def test_unused_encoder_stages_are_not_stored():
    shallow = build_model(architecture_config("unetplusplus", "resnet18", encoder_depth=4))
    full = build_model(architecture_config("unetplusplus", "resnet18", encoder_depth=5))
    assert not any(k.startswith("encoder.layer4") for k in shallow.state_dict())
    assert sum(p.numel() for p in shallow.parameters()) < 0.5 * sum(p.numel() for p in full.parameters())
    with torch.no_grad():
        assert shallow.eval()(torch.randn(1, 64, 32, 32)).shape == (1, 1, 32, 32)


def _copy(tiny_model, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_model, target)
    return target


def test_card_that_does_not_match_the_weights_is_refused(tiny_model, tmp_path):
    broken = _copy(tiny_model, tmp_path)
    card = json.loads((broken / "model.json").read_text())
    card["model"]["decoder_channels"] = [64, 32, 16]
    card.pop("weights")
    (broken / "model.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="does not match the architecture in model.json"):
        load_model(broken)


def test_replaced_weights_fail_the_hash_check(tiny_model, tmp_path):
    broken = _copy(tiny_model, tmp_path)
    config = architecture_config("unet", "resnet18", encoder_depth=3, decoder_channels=[32, 16, 8])
    other = tmp_path / "other"
    save_model(other, build_model(config), make_card(config, name="x", target_mean=0, target_std=1))
    shutil.copy(other / "model.safetensors", broken / "model.safetensors")
    with pytest.raises(InputError, match="does not match the hash"):
        load_model(broken)


@pytest.mark.parametrize("damage, expected", [
    ("no_card", "has no model.json"),
    ("bad_json", "is not valid JSON"),
    ("not_ours", "is not an AlphaEarth Height model card"),
    ("no_weights", "has no model.safetensors"),
    ("pickle_only", "found pickled model.pt, which is never loaded"),
    ("garbage_weights", "does not match the hash"),
])
def test_broken_model_folders_give_clear_errors(tiny_model, tmp_path, damage, expected):
    broken = _copy(tiny_model, tmp_path)
    if damage == "no_card":
        (broken / "model.json").unlink()
    elif damage == "bad_json":
        (broken / "model.json").write_text("{not json")
    elif damage == "not_ours":
        (broken / "model.json").write_text(json.dumps({"format": "something else"}))
    elif damage in ("no_weights", "pickle_only"):
        (broken / "model.safetensors").unlink()
        if damage == "pickle_only":
            torch.save({"x": torch.zeros(1)}, broken / "model.pt")
    elif damage == "garbage_weights":
        (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match=expected):
        load_model(broken)


def test_pickled_checkpoint_path_is_refused_without_loading(tmp_path):
    marker = tmp_path / "was-unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    evil = tmp_path / "model.pth"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(InputError, match="pickled PyTorch checkpoint"):
        load_model(evil)
    assert not marker.exists()


def test_bundled_model_is_small_and_says_what_it_was_trained_on():
    folder = bundled_model_dir()
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size <= 25 * 1024 * 1024
    package = load_model(folder)
    card = package.card
    assert card["model"]["architecture"] == "unetplusplus" and card["model"]["encoder"] == "resnet18"
    assert "synthetic" in card["training"]["region"]
    assert card["training"]["crs"] == "EPSG:32630"
    assert card["metrics"]["test"]["r2"] > 0.5
