"""A model trained with the new options through Processing, then used by Processing's predict."""

import pytest

pytest.importorskip("qgis.core")


from alphaearth_height.plugin.core.models import load_model  # noqa: E402


@pytest.fixture(scope="module")
def run(run_algorithm):
    return run_algorithm


def test_a_model_trained_with_blocks_and_balance_predicts_in_processing(run, small_scene, tmp_path):
    model = tmp_path / "model"
    run("trainmodel", {"EMBEDDINGS": str(small_scene.embeddings), "REFERENCE": str(small_scene.reference),
                       "ARCH": 0, "ENCODER_DEPTH": 3, "PATCH_SIZE": 64, "BATCH_SIZE": 2, "EPOCHS": 1,
                       "STEPS_PER_EPOCH": 2, "SPLIT": 1, "BLOCK_SIZE": 64, "BUFFER": 4, "LOSS": 2, "BALANCE": True,
                       "DEVICE": 1, "OUTPUT": str(model)})
    card = load_model(model).card
    assert card["training"]["split"]["kind"] == "blocks" and card["training"]["loss"] == "l1"
    assert card["training"]["balanced_sampling"] is True
    out = tmp_path / "height.tif"
    result = run("predictheight", {"INPUT": str(small_scene.embeddings), "MODEL": str(model), "DEVICE": 1,
                                   "OUTPUT": str(out)})
    assert result["OUTPUT"] == str(out) and out.is_file()
