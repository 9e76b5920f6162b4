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


@pytest.mark.parametrize("field, value, expected", [
    # seen in the safetensors header, without torch (open_package)
    ("decoder_channels", [64, 32, 16], r"card says decoder_channels \[64, 32, 16\] but the weights have \[32, 16, 8\]"),
    ("architecture", "unetplusplus", "card says architecture unetplusplus but the weights are a unet"),
    # seen only by building the network (on the meta device, before any memory is allocated)
    ("encoder", "resnet34", r"does not match the architecture in model.json \(\d+ missing, 0 unexpected"),
])
def test_card_that_does_not_match_the_weights_is_refused(tiny_model, tmp_path, field, value, expected):
    broken = _copy(tiny_model, tmp_path)
    card = json.loads((broken / "model.json").read_text())
    card["model"][field] = value
    card.pop("weights")
    (broken / "model.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match=expected):
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


def test_a_card_that_does_not_fit_is_refused_before_the_network_is_allocated(tiny_model, tmp_path, monkeypatch):
    from alphaearth_height.plugin.core import models

    broken = _copy(tiny_model, tmp_path)
    card = json.loads((broken / "model.json").read_text())
    card["model"]["encoder"] = "resnet50"  # same stem and decoder names, other shapes: only a build can tell
    (broken / "model.json").write_text(json.dumps(card))
    built = []
    real_build = models.build_model

    def recording_build(config):
        module = real_build(config)
        params = list(module.parameters())
        built.append((sum(p.numel() for p in params if p.device.type != "meta"), sum(p.numel() for p in params)))
        return module

    monkeypatch.setattr(models, "build_model", recording_build)
    with pytest.raises(InputError, match="does not match the architecture in model.json"):
        load_model(broken)
    # only a skeleton was built: no memory but the 64-band stem smp re-creates on the CPU
    stem = 64 * 64 * 7 * 7
    assert len(built) == 1 and built[0][0] <= stem < built[0][1]
    assert load_model(tiny_model).module is not None
    assert len(built) == 3 and built[1][0] <= stem and built[2][0] == built[2][1]  # skeleton, then the network


def test_an_unknown_architecture_is_named_as_such_not_blamed_on_the_encoder():
    config = architecture_config("unet", "resnet18", encoder_depth=3)
    with pytest.raises(InputError) as info:
        build_model({**config, "architecture": "segformer"})
    assert info.value.subject == "architecture 'segformer'" and "encoder" not in str(info.value)
    with pytest.raises(InputError) as info:
        build_model({**config, "encoder": "resnet999"})
    assert info.value.subject == "encoder 'resnet999'"


NO_TORCH = """
import json, sys
sys.modules["torch"] = None  # any import of torch now fails, as in the plugin's lean ONNX environment
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.models import open_package
for folder in sys.argv[1:]:
    try:
        open_package(folder)
        print("accepted")
    except InputError as exc:
        print(exc)
"""


def test_open_package_checks_card_and_weights_without_torch(tiny_model, tmp_path):
    """The ONNX path never imports torch: the card's types and ranges and its fit to the weights'
    shapes (from the safetensors header) are checked all the same."""
    import subprocess
    import sys

    def variant(name, edit=None, weights=None):
        folder = tmp_path / name
        shutil.copytree(tiny_model, folder)
        card = json.loads((folder / "model.json").read_text())
        if edit:
            edit(card)
        if weights:
            card.pop("weights")
            (folder / "model.safetensors").write_bytes(weights((folder / "model.safetensors").read_bytes()))
        (folder / "model.json").write_text(json.dumps(card))
        return folder

    folders = [
        variant("fine"),
        variant("channels", lambda c: c["model"].update(decoder_channels=[64, 32, 16])),
        variant("huge", lambda c: c["model"].update(decoder_channels=[100000, 16, 8])),
        variant("depth", lambda c: c["model"].update(encoder_depth="four")),
        variant("bands", lambda c: c["model"].update(in_channels=3)),
        variant("mean", lambda c: c["target"]["normalisation"].pop("mean")),
        variant("std", lambda c: c["target"]["normalisation"].update(std=float("nan"))),
        variant("truncated", weights=lambda data: data[:len(data) // 3]),
        variant("garbage", weights=lambda data: b"\xff" * len(data)),
    ]
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, folders)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    expected = ["accepted", "decoder_channels [64, 32, 16] but the weights have [32, 16, 8]",
                "model.decoder_channels = [100000, 16, 8]", 'model.encoder_depth = "four"',
                "model.in_channels = 3", "lacks target.normalisation.mean", "target.normalisation.std = NaN",
                "is truncated", "is not a safetensors file"]
    assert len(lines) == len(expected), done.stdout
    for line, needle in zip(lines, expected):
        assert needle in line, (needle, line)
