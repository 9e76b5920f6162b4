"""Bad inputs: rasters, model folders and cards, correction CSVs, sizes, options."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import rasterio
from affine import Affine

from conftest import UTM, unit_embeddings, write_embeddings

from . import Case


def _predict(ws, embeddings, model=None, *extra):
    return ["predict", "--embeddings", embeddings, "--model", model or ws.model, "--out", ws.out / "h.tif", *extra]


def _processing_predict(path_fn, model_fn=None, **extra):
    """Processing's predict on the same inputs as the CLI case."""
    def params(ws):
        return ("predictheight", {"INPUT": str(path_fn(ws)), "MODEL": str(model_fn(ws) if model_fn else ws.model),
                                  "OUTPUT": str(ws.out / "h.tif"), **extra})
    return params


def _three_band(ws):
    bad = write_embeddings(ws.inputs / "three.tif", unit_embeddings(16, 16)[:3], quantised=False)
    return ["predict", "--embeddings", bad, "--model", ws.model, "--out", ws.out / "h.tif"]


def _pickled_model(ws):
    folder = ws.inputs / "pickled"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"\x80\x04not really a pickle")
    return ["predict", "--embeddings", ws.scene.embeddings, "--model", folder / "model.pt", "--out", ws.out / "h.tif"]


def _missing_model(ws):
    return ["predict", "--embeddings", ws.scene.embeddings, "--model", ws.inputs / "nope", "--out", ws.out / "h.tif"]


def _bad_tile(ws):
    return ["predict", "--embeddings", ws.scene.embeddings, "--model", ws.model, "--out", ws.out / "h.tif",
            "--tile", "100"]


# ---- embeddings values: out of range, all nodata ------------------------------------------------

def _scaled_path(ws):
    return ws.inputs / "scaled.tif"


def _scaled(ws):
    """Float embeddings, fine except one pixel near the far corner (1e30, as a foreign raster would hold):
    found only when that window is read, after earlier tiles were predicted."""
    if not _scaled_path(ws).exists():
        values = unit_embeddings(160, 160)
        values[5, 150, 150] = 1e30
        write_embeddings(_scaled_path(ws), values, quantised=False)
    ws.earlier_output("h.tif")  # an earlier prediction at --out: must survive untouched
    return _predict(ws, _scaled_path(ws), None, "--tile", "64", "--overlap", "16", "--batch-size", "1")


def _all_nodata_path(ws):
    return ws.inputs / "nodata.tif"


def _all_nodata(ws):
    if not _all_nodata_path(ws).exists():
        write_embeddings(_all_nodata_path(ws), np.full((64, 96, 96), np.nan, dtype=np.float32))  # int8 -128
    return _predict(ws, _all_nodata_path(ws))


def _all_infinite(ws):
    values = unit_embeddings(64, 64)
    values[:, :, :32] = np.inf
    values[:, :, 32:] = -np.inf
    write_embeddings(ws.inputs / "inf.tif", values, quantised=False)
    return _predict(ws, ws.inputs / "inf.tif", None, "--backend", "torch")


# ---- truncated rasters ---------------------------------------------------------------------------

def _truncated_copy(source, target):
    data = open(source, "rb").read()
    target.write_bytes(data[:len(data) // 2])  # header and tile index intact, pixel data cut off
    return target


def _truncated_embeddings_path(ws):
    return ws.inputs / "truncated.tif"


def _truncated_embeddings(ws):
    if not _truncated_embeddings_path(ws).exists():
        _truncated_copy(ws.scene.embeddings, _truncated_embeddings_path(ws))
    return _predict(ws, _truncated_embeddings_path(ws))


def _truncated_reference(ws):
    if not (ws.inputs / "truncated_dsm.tif").exists():
        _truncated_copy(ws.scene.reference, ws.inputs / "truncated_dsm.tif")
    return ["compare", "--predicted", ws.scene.reference, "--reference", ws.inputs / "truncated_dsm.tif",
            "--out", ws.out / "diff.tif", "--metrics", ws.out / "metrics.json"]


def _truncated_predicted(ws):
    if not (ws.inputs / "truncated_pred.tif").exists():
        _truncated_copy(ws.scene.reference, ws.inputs / "truncated_pred.tif")
    ws.earlier_output("diff.tif")
    return ["compare", "--predicted", ws.inputs / "truncated_pred.tif", "--reference", ws.scene.reference,
            "--out", ws.out / "diff.tif"]


def _compare_processing(predicted, reference, **extra):
    def params(ws):
        return ("compareheights", {"PREDICTED": str(predicted(ws)), "REFERENCE": str(reference(ws)),
                                   "OUTPUT": str(ws.out / "diff.tif"), "METRICS": str(ws.out / "metrics.json"),
                                   **extra})
    return params


# ---- compare: bands ------------------------------------------------------------------------------

def _multiband_reference(ws):
    return ["compare", "--predicted", ws.scene.reference, "--reference", ws.scene.embeddings,
            "--out", ws.out / "diff.tif"]


def _reference_band_out_of_range(ws):
    return _multiband_reference(ws) + ["--reference-band", "70"]


def _multiband_predicted(ws):
    return ["compare", "--predicted", ws.scene.embeddings, "--reference", ws.scene.reference,
            "--metrics", ws.out / "metrics.json"]


# ---- model cards and weights ---------------------------------------------------------------------

def _edited_card(edit, *extra, name="edited"):
    """A copy of the tiny model whose card ``edit`` changes (the weights' hash still matches)."""
    def args(ws):
        folder = ws.inputs / name
        if not folder.exists():
            ws.copy_model(name)
            card = json.loads((folder / "model.json").read_text())
            edit(card)
            (folder / "model.json").write_text(json.dumps(card, indent=2))
        return _predict(ws, ws.scene.embeddings, folder, *extra)
    return args


def _set(section, key, value):
    def edit(card):
        card[section][key] = value
    return edit


def _drop_target_mean(card):
    del card["target"]["normalisation"]["mean"]


def _nan_std(card):
    card["target"]["normalisation"]["std"] = math.nan  # json writes NaN, which Python's json reads back


def _rgb_model(ws, card_in_channels=None):
    """Weights of a network built for 3 input bands (as an RGB segmentation model's), with a card
    saying so (or ``card_in_channels``); written by hand, as save_model refuses such a card."""
    from safetensors.torch import save_file

    from alphaearth_height.plugin.core.models import CARD_FORMAT, build_model, make_card

    folder = ws.inputs / ("rgb" if card_in_channels is None else "rgb-relabelled")
    if not folder.exists():
        folder.mkdir()
        config = {"architecture": "unet", "encoder": "resnet18", "encoder_depth": 3,
                  "decoder_channels": [32, 16, 8], "in_channels": 3, "classes": 1}
        save_file({k: v.contiguous() for k, v in build_model(config).state_dict().items()},
                  str(folder / "model.safetensors"))
        card = make_card({**config, "in_channels": card_in_channels or 3}, name="rgb", target_mean=0.0,
                         target_std=1.0)
        (folder / "model.json").write_text(json.dumps({**card, "format": CARD_FORMAT, "format_version": 1}))
    return folder


def _damaged_weights(kind, keep_hash):
    def args(ws):
        folder = ws.inputs / f"{kind}-{keep_hash}"
        if not folder.exists():
            ws.copy_model(folder.name)
            weights = folder / "model.safetensors"
            data = weights.read_bytes()
            weights.write_bytes(data[:len(data) // 2] if kind == "truncated" else os.urandom(len(data)))
            if not keep_hash:  # a hand-made card without the hash: the file itself must be checked
                card = json.loads((folder / "model.json").read_text())
                card.pop("weights", None)
                (folder / "model.json").write_text(json.dumps(card))
        return _predict(ws, ws.scene.embeddings, folder, "--backend", "onnx")
    return args


# ---- size guard ----------------------------------------------------------------------------------

HUGE = 200_000


def _huge_path(ws):
    return ws.inputs / "huge.tif"


def _huge(ws):
    """A 200,000 px square, 64-band header with no pixel data written (sparse): a few hundred kB on disk."""
    if not _huge_path(ws).exists():
        with rasterio.open(_huge_path(ws), "w", driver="GTiff", width=HUGE, height=HUGE, count=64, dtype="int8",
                           nodata=-128, crs=UTM, transform=Affine(10, 0, 600_000, 0, -10, 5_000_000), tiled=True,
                           blockxsize=1024, blockysize=1024, interleave="pixel", compress="deflate",
                           BIGTIFF="YES", SPARSE_OK="TRUE"):
            pass
    return _predict(ws, _huge_path(ws))


def _over_max_mpx(ws):
    return _predict(ws, ws.scene.embeddings, None, "--max-mpx", "0.01")


# ---- correct: CSV points -------------------------------------------------------------------------

def _points(ws, text, name="points.csv", encoding="utf-8"):
    path = ws.inputs / name
    path.write_bytes(text.encode(encoding))
    return path


def _correct(ws, points, *extra):
    """``correct`` on the scene's DSM as the prediction (EPSG:2154, x 416260..419010, y 6426360..6429110)."""
    return ["correct", "--predicted", ws.scene.reference, "--out", ws.out / "corrected.tif", "--points", points,
            *extra]


INSIDE = "417000,6428000,50\n417500,6427500,60\n418000,6428500,55\n"


def _csv_case(text, *extra, encoding="utf-8"):
    def args(ws):
        ws.earlier_output("corrected.tif")
        return _correct(ws, _points(ws, text, encoding=encoding), *extra)
    return args


def _points_path(ws):
    return str(ws.inputs / "points.csv")


CASES = [
    Case("predict: 3-band embeddings", _three_band, lambda ws: [str(ws.inputs / "three.tif"), "64"],
         processing=lambda ws: ("predictheight", {"INPUT": str(ws.inputs / "three.tif"), "MODEL": str(ws.model),
                                                  "OUTPUT": str(ws.out / "h.tif")})),
    Case("predict: pickled checkpoint", _pickled_model, ("model.pt", "pickle", "safetensors")),
    Case("predict: missing model folder", _missing_model, ("nope", "not a model folder"),
         processing=lambda ws: ("predictheight", {"INPUT": str(ws.scene.embeddings), "MODEL": str(ws.inputs / "nope"),
                                                  "OUTPUT": str(ws.out / "h.tif")})),
    Case("predict: tile not a multiple of the model's", _bad_tile, ("tile size 100", "multiple")),

    # embeddings values
    Case("predict: float embeddings far outside [-1, 1]", _scaled,
         lambda ws: [str(_scaled_path(ws)), "1e+30", "[-1, 1]"],
         processing=_processing_predict(_scaled_path, TILE=64, OVERLAP=16, BATCH_SIZE=1)),
    Case("predict: all-nodata AEF embeddings", _all_nodata,
         lambda ws: [str(_all_nodata_path(ws)), "no valid pixel", "96 x 96"],
         processing=_processing_predict(_all_nodata_path)),
    Case("predict: embeddings all +-Inf (torch)", _all_infinite,
         lambda ws: [str(ws.inputs / "inf.tif"), "no valid pixel"]),

    # truncated rasters
    Case("predict: truncated embeddings GeoTIFF", _truncated_embeddings,
         lambda ws: [str(_truncated_embeddings_path(ws)), "cannot be read", "truncated"],
         processing=_processing_predict(_truncated_embeddings_path)),
    Case("compare: truncated reference DSM", _truncated_reference,
         lambda ws: [str(ws.inputs / "truncated_dsm.tif"), "cannot be read", "truncated"],
         processing=_compare_processing(lambda ws: ws.scene.reference, lambda ws: ws.inputs / "truncated_dsm.tif")),
    Case("compare: truncated prediction", _truncated_predicted,
         lambda ws: [str(ws.inputs / "truncated_pred.tif"), "cannot be read", "truncated"],
         processing=_compare_processing(lambda ws: ws.inputs / "truncated_pred.tif", lambda ws: ws.scene.reference)),

    # compare: several bands
    Case("compare: 64-band raster as reference", _multiband_reference,
         lambda ws: [str(ws.scene.embeddings), "64 bands", "--reference-band"],
         processing=_compare_processing(lambda ws: ws.scene.reference, lambda ws: ws.scene.embeddings)),
    Case("compare: --reference-band beyond the bands", _reference_band_out_of_range,
         ("reference band 70", "has 64", "from 1 to 64"),
         processing=_compare_processing(lambda ws: ws.scene.reference, lambda ws: ws.scene.embeddings,
                                        REFERENCE_BAND=70)),
    Case("compare: 64-band raster as prediction", _multiband_predicted,
         lambda ws: [str(ws.scene.embeddings), "64 bands", "predicted height raster has one"]),

    # model cards
    Case("predict: card without target.normalisation.mean", _edited_card(_drop_target_mean),
         ("model.json", "target.normalisation.mean"),
         processing=_processing_predict(lambda ws: ws.scene.embeddings, lambda ws: ws.inputs / "edited")),
    Case("predict: card with encoder_depth 'four'", _edited_card(_set("model", "encoder_depth", "four")),
         ("model.json", "model.encoder_depth", '"four"', "3 to 5")),
    Case("predict: card with architecture 'segformer'", _edited_card(_set("model", "architecture", "segformer")),
         ("model.json", "architecture", "segformer", "not supported")),
    Case("predict: card with architecture unetplusplus for U-Net weights",
         _edited_card(_set("model", "architecture", "unetplusplus"), "--backend", "onnx"),
         ("model.safetensors", "architecture unetplusplus", "weights are a unet")),
    Case("predict: card with an encoder smp does not know (torch)",
         _edited_card(_set("model", "encoder", "resnet999"), "--backend", "torch"),
         ("encoder 'resnet999'", "unknown to segmentation-models-pytorch")),
    Case("predict: card with decoder_channels [100000, ...] (torch)",
         _edited_card(_set("model", "decoder_channels", [100000, 16, 8]), "--backend", "torch"),
         ("model.json", "decoder_channels", "100000", "4096"), timeout_s=120),
    Case("predict: card decoder_channels that do not fit the weights (ONNX)",
         _edited_card(_set("model", "decoder_channels", [64, 32, 16]), "--backend", "onnx"),
         ("model.safetensors", "decoder_channels [64, 32, 16]", "[32, 16, 8]"),
         processing=_processing_predict(lambda ws: ws.scene.embeddings, lambda ws: ws.inputs / "edited")),
    Case("predict: card with NaN target std", _edited_card(_nan_std),
         ("model.json", "target.normalisation.std", "NaN")),
    Case("predict: card with target std 0", _edited_card(_set("target", "normalisation", {"mean": 1.0, "std": 0})),
         ("model.json", "target.normalisation.std", "positive")),
    Case("predict: card with inference.tile 'big'", _edited_card(_set("inference", "tile", "big")),
         ("model.json", "inference.tile")),
    Case("predict: 3-band model with a consistent card", lambda ws: _predict(ws, ws.scene.embeddings, _rgb_model(ws)),
         lambda ws: [str(ws.inputs / "rgb" / "model.json"), "model.in_channels = 3", "64"]),
    Case("predict: 3-band weights under a card saying 64 (torch)",
         lambda ws: _predict(ws, ws.scene.embeddings, _rgb_model(ws, card_in_channels=64), "--backend", "torch"),
         ("model.safetensors", "in_channels 64", "3 input bands")),

    # model weights
    Case("predict: truncated model.safetensors (hash in card)", _damaged_weights("truncated", True),
         ("model.safetensors", "hash")),
    Case("predict: truncated model.safetensors (no hash in card)", _damaged_weights("truncated", False),
         ("model.safetensors", "truncated"),
         processing=_processing_predict(lambda ws: ws.scene.embeddings, lambda ws: ws.inputs / "truncated-False")),
    Case("predict: garbage model.safetensors (no hash in card)", _damaged_weights("garbage", False),
         ("model.safetensors", "not a safetensors file")),

    # size guard
    Case("predict: 200,000 px square header", _huge, lambda ws: [str(_huge_path(ws)), "200,000 x 200,000",
                                                                 "--yes", "tiles"]),
    Case("predict: 200,000 px square header (also Processing)", _huge,
         lambda ws: [str(_huge_path(ws)), "200,000 x 200,000", "limit of 100 Mpx"],
         processing=_processing_predict(_huge_path)),  # its own fix (tests/qgis: 'Allow large areas')
    Case("predict: above --max-mpx", _over_max_mpx, ("256 x 256", "0.01 Mpx", "--max-mpx")),

    # correct: CSV points
    Case("correct: short CSV row", _csv_case("x,y,height\n417000,6428000,50\n417100,6428100\n"),
         lambda ws: [_points_path(ws), "line 3", "lacks height"]),
    Case("correct: value that is not a number", _csv_case("x,y,height\n417000,6428000,fifty\n"),
         lambda ws: [_points_path(ws), "line 2", "not a number"]),
    Case("correct: empty CSV", _csv_case(""), lambda ws: [_points_path(ws), "is empty"]),
    Case("correct: CSV with a header only", _csv_case("x,y,height\n"), lambda ws: [_points_path(ws), "no points"]),
    Case("correct: CSV without a height column", _csv_case("x,y,z\n" + INSIDE),
         lambda ws: [_points_path(ws), "no column height"]),
    Case("correct: CSV not in UTF-8", _csv_case("x,y,height,lieu\n417000,6428000,50,Périgueux\n", encoding="latin-1"),
         lambda ws: [_points_path(ws), "cannot be read"]),
    Case("correct: --points-crs GDAL does not know", _csv_case("x,y,height\n" + INSIDE, "--points-crs", "EPSG:999999"),
         ("--points-crs EPSG:999999", "not a CRS")),
    Case("correct: points in another CRS than the prediction's",
         _csv_case("x,y,height\n690100,4974900,50\n690500,4974500,60\n"),
         lambda ws: [_points_path(ws), "none of its 2 point(s)", "--points-crs"]),
    Case("correct: --points-crs that does not fit the points",
         _csv_case("x,y,height\n" + INSIDE, "--points-crs", "EPSG:4326"),
         lambda ws: [_points_path(ws), "not coordinates in --points-crs EPSG:4326"]),
    Case("correct: missing CSV", lambda ws: _correct(ws, ws.inputs / "absent.csv"), ("absent.csv", "does not exist")),
]
