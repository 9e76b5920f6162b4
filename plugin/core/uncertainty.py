"""Per-pixel uncertainty by test-time augmentation: the spread (std) of the model's
heights over the 8 flips/quarter-turns of each tile (4 flips on non-square tiles).

It runs through ``predict_height`` with the model wrapped, so it keeps the streaming,
blending and bounded memory of ordinary prediction; the cost is 8 forward passes a tile.
"""

from __future__ import annotations

import os
from typing import Any

from .inference import PredictionResult, predict_height
from .models import ModelPackage, load_model


def _augmented(module: Any):
    import torch

    class SpreadOverAugmentations(torch.nn.Module):
        """Std over the dihedral transforms of the input, each undone on the output."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x):
            turns = (0, 1, 2, 3) if x.shape[-1] == x.shape[-2] else (0, 2)
            outputs = []
            for k in turns:
                for flip in (False, True):
                    t = torch.rot90(x, k, (2, 3))
                    t = torch.flip(t, (3,)) if flip else t
                    y = self.inner(t)
                    y = torch.flip(y, (3,)) if flip else y
                    outputs.append(torch.rot90(y, -k, (2, 3)))
            return torch.stack(outputs).float().std(0, unbiased=False)

    return SpreadOverAugmentations()


DESCRIPTION = "height uncertainty: std over flips and rotations (test-time augmentation)"
BACKEND = "torch"  # the augmentations are a torch wrapper, not part of the ONNX graph


def uncertainty_package(package: ModelPackage) -> ModelPackage:
    """``package`` wrapped to output the TTA spread (m) instead of the height.

    The spread is a difference of heights, so the target's mean is dropped and only its
    std scales the model's output. One place for the one-process run and the Dask chunks.
    """
    card = {**package.card, "target": {**package.card["target"],
                                       "normalisation": {"mean": 0.0, "std": package.target_std}}}
    return ModelPackage(_augmented(package.torch_module()), card, package.path)


def uncertainty_tags(package: ModelPackage) -> dict[str, str]:
    """The band's tags: the method, and the card's calibration (``training.calibration``) as the
    scale that turns the spread into a 90 % interval, when the model has one."""
    tags = {"METHOD": "test-time augmentation, 8 dihedral transforms (4 on non-square tiles)"}
    k = package.card.get("uncertainty", {}).get("k") if isinstance(package.card.get("uncertainty"), dict) else None
    if k:
        tags.update(INTERVAL_90_SCALE=f"{k:.4f}", INTERVAL_90=f"prediction ± {k:.2f} x this value (calibrated on "
                                                              "the model's validation area)")
    return tags


def predict_uncertainty(embeddings: str | os.PathLike, model: str | os.PathLike | ModelPackage,
                        out_path: str | os.PathLike, **options) -> PredictionResult:
    """Write the TTA spread (m) of the model's heights on the embedding grid.

    No terrain, also for a model trained relative to one: the spread of the relief is the
    spread of the height.
    """
    package = model if isinstance(model, ModelPackage) else load_model(model)
    options["backend"] = BACKEND
    # described as it is written: changing the finished file in place could break it on a full disk
    return predict_height(embeddings, uncertainty_package(package), out_path, relative=True,
                          description=DESCRIPTION, band_tags=uncertainty_tags(package), **options)
