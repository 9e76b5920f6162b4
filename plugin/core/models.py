"""Model packages: a folder with ``model.safetensors`` (weights), ``model.json`` (card)
and, for lean CPU inference, ``model.onnx`` (the graph).

The card is the single source of truth: it builds the network, tells inference how to
prepare the input and undo the target normalisation, and records what the model was
trained on. Pickled checkpoints are never loaded. The ONNX graph stores no weights of
its own: its tensors point into ``model.safetensors`` (ONNX external data), so a
package carries its weights once and ONNX Runtime needs no torch to run it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import aef
from .errors import InputError

log = logging.getLogger(__name__)

CARD_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
ONNX_INPUT, ONNX_OUTPUT = "embeddings", "height"
CARD_FORMAT = "alphaearth-height-model"
ARCHITECTURES = {"unet": "Unet", "unetplusplus": "UnetPlusPlus"}
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".bin")
DEFAULT_DECODER_CHANNELS = {5: [256, 128, 64, 32, 16], 4: [128, 64, 32, 16], 3: [64, 32, 16]}
ENCODER_DEPTHS = (3, 4, 5)
MAX_DECODER_CHANNELS = 4096  # the paper's widest stage is 256; beyond this a card is a typo, not a model
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1}
RESTORE_CARD = "Restore model.json from the model's release or its training run folder"


def architecture_config(arch: str = "unetplusplus", encoder: str = "resnet18", encoder_depth: int = 5,
                        decoder_channels: list[int] | None = None) -> dict[str, Any]:
    """The card's ``model`` section: everything needed to rebuild the network."""
    if arch not in ARCHITECTURES:
        raise InputError(f"architecture '{arch}'", "is not supported",
                         f"Use one of: {', '.join(ARCHITECTURES)}")
    if not 3 <= encoder_depth <= 5:
        raise InputError(f"encoder depth {encoder_depth}", "is out of range", "Use 3, 4 or 5")
    channels = list(decoder_channels or DEFAULT_DECODER_CHANNELS[encoder_depth])
    if len(channels) != encoder_depth:
        raise InputError(f"decoder channels {channels}", f"need {encoder_depth} values (one per encoder stage)",
                         "Give as many decoder channels as the encoder depth")
    return {"architecture": arch, "encoder": encoder, "encoder_depth": encoder_depth,
            "decoder_channels": channels, "in_channels": aef.N_BANDS, "classes": 1}


def build_model(config: dict[str, Any]):
    """Build the torch module a card's ``model`` section describes (no pretrained weights)."""
    import segmentation_models_pytorch as smp
    import torch

    depth = int(config["encoder_depth"])
    if config["architecture"] not in ARCHITECTURES:
        raise InputError(f"architecture '{config['architecture']}'", "is not supported",
                         f"Use one of: {', '.join(ARCHITECTURES)}")
    try:
        model = smp.create_model(
            config["architecture"], encoder_name=config["encoder"], encoder_weights=None,
            in_channels=int(config["in_channels"]), classes=int(config["classes"]),
            encoder_depth=depth, decoder_channels=list(config["decoder_channels"]))
    except KeyError:
        raise InputError(f"encoder '{config['encoder']}'",
                         f"is unknown to segmentation-models-pytorch {smp.__version__}",
                         "Pick an encoder from segmentation_models_pytorch.encoders.get_encoder_names()") from None
    # ResNet encoders keep stages beyond `depth` that forward() never runs; dropping
    # them keeps weight files small and the saved state equal to what is used.
    for stage in range(depth, 5):
        if isinstance(getattr(model.encoder, f"layer{stage}", None), torch.nn.Module):
            setattr(model.encoder, f"layer{stage}", torch.nn.Identity())
    return model


def size_multiple(config: dict[str, Any]) -> int:
    """Tiles must be multiples of this (2 ** encoder depth) for the skip connections to align."""
    return 2 ** int(config["encoder_depth"])


@dataclass
class ModelPackage:
    """A validated model folder: its card, and the torch module once loaded (eval mode, CPU).

    ``open_package`` checks the files without importing torch (``module`` stays None);
    ``load_model`` also builds the network.
    """

    module: Any
    card: dict[str, Any]
    path: Path

    @property
    def onnx_path(self) -> Path | None:
        """The ONNX graph, when the package has one."""
        path = self.path / ONNX_FILE
        return path if path.is_file() else None

    def torch_module(self) -> Any:
        """The torch module, loading it on first use."""
        if self.module is None:
            self.module = load_model(self.path).module
        return self.module

    @property
    def name(self) -> str:
        return str(self.card.get("name", self.path.name))

    @property
    def target_mean(self) -> float:
        return float(self.card["target"]["normalisation"]["mean"])

    @property
    def target_std(self) -> float:
        return float(self.card["target"]["normalisation"]["std"])

    @property
    def multiple(self) -> int:
        return size_multiple(self.card["model"])

    def default(self, key: str, fallback: int) -> int:
        return int(self.card.get("inference", {}).get(key, fallback))


def make_card(model_config: dict[str, Any], *, name: str, target_mean: float, target_std: float,
              tile: int = 256, overlap: int = 64, **sections: Any) -> dict[str, Any]:
    """A model card with the sections inference needs; ``sections`` adds training, metrics..."""
    return {
        "name": name,
        "model": model_config,
        "input": {"bands": "A00..A63", "dequantisation": "AEF int8: sign(q) * (|q| / 127.5)^2; -128 = nodata",
                  "normalisation": "none (unit-length embeddings)", "nodata_fill": 0.0},
        "target": {"quantity": "surface height", "units": "m",
                   "normalisation": {"mean": float(target_mean), "std": float(target_std)}},
        "inference": {"tile": int(tile), "overlap": int(overlap)},
        **sections,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def software_versions() -> dict[str, str]:
    import segmentation_models_pytorch as smp
    import torch

    from ... import __version__ as ours

    return {"alphaearth_height": ours, "torch": torch.__version__,
            "segmentation_models_pytorch": smp.__version__}


def save_model(folder: str | os.PathLike, module: Any, card: dict[str, Any]) -> Path:
    """Write weights and card; the card gets the weights' hash, size and software versions."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    weights = folder / WEIGHTS_FILE
    save_file(state, str(weights), metadata={"format": CARD_FORMAT})
    card = dict(card)
    card.update(format=CARD_FORMAT, format_version=1, software=software_versions(), weights={
        "file": WEIGHTS_FILE, "sha256": _sha256(weights),
        "parameters": int(sum(v.numel() for v in state.values())),
    })
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    if onnx_export_available():
        export_onnx(folder)
    else:
        log.warning("%s: no ONNX graph written (the 'onnx' package is missing); "
                    "add one later with: alphaearth-height export-onnx --model %s", folder, folder)
    return folder


def read_card(folder: Path) -> dict[str, Any]:
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise InputError(folder, f"has no {CARD_FILE} model card",
                         "Give a model folder written by 'alphaearth-height train' (model.json + model.safetensors)")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(card_path, f"is not valid JSON ({exc})", "Restore the card from the model's release") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise InputError(card_path, "is not an AlphaEarth Height model card",
                         "Give a model folder written by 'alphaearth-height train'")
    for key in ("model", "target"):
        if key not in card:
            raise InputError(card_path, f"lacks the '{key}' section", "Restore the card from the model's release")
    validate_card(card, card_path)
    return card


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_card(card: dict[str, Any], card_path: object) -> None:
    """Types and ranges of everything inference reads from a card; one line naming the field otherwise.

    Runs before any network is built (a typo such as 100000 decoder channels would
    otherwise try to allocate hundreds of GB) and without torch, so the ONNX path checks
    the same card.
    """
    def bad(field: str, value: Any, expected: str) -> InputError:
        return InputError(card_path, f"has {field} = {json.dumps(value)}, but it must be {expected}", RESTORE_CARD)

    model = card["model"]
    if not isinstance(model, dict):
        raise bad("model", model, "an object (architecture, encoder, ...)")
    for key in ("architecture", "encoder", "encoder_depth", "decoder_channels", "in_channels", "classes"):
        if key not in model:
            raise InputError(card_path, f"lacks model.{key}", RESTORE_CARD)
    arch = model["architecture"]
    if arch not in ARCHITECTURES:
        raise InputError(card_path, f"names the architecture {json.dumps(arch)}, which is not supported "
                         f"(only {', '.join(ARCHITECTURES)})", RESTORE_CARD)
    if not isinstance(model["encoder"], str) or not model["encoder"].strip():
        raise bad("model.encoder", model["encoder"], "an encoder name such as \"resnet18\"")
    depth = model["encoder_depth"]
    if not _is_int(depth) or depth not in ENCODER_DEPTHS:
        raise bad("model.encoder_depth", depth, "an integer from 3 to 5")
    channels = model["decoder_channels"]
    if (not isinstance(channels, list) or len(channels) != depth
            or not all(_is_int(c) and 1 <= c <= MAX_DECODER_CHANNELS for c in channels)):
        raise bad("model.decoder_channels", channels,
                  f"{depth} integers (one per encoder stage) from 1 to {MAX_DECODER_CHANNELS}")
    if model["in_channels"] != aef.N_BANDS or not _is_int(model["in_channels"]):
        raise bad("model.in_channels", model["in_channels"],
                  f"{aef.N_BANDS} (the AlphaEarth bands A00..A63): this model was not made for embeddings")
    if model["classes"] != 1 or not _is_int(model["classes"]):
        raise bad("model.classes", model["classes"], "1 (one height per pixel)")
    target = card["target"]
    norm = target.get("normalisation") if isinstance(target, dict) else None
    if not isinstance(norm, dict):
        raise InputError(card_path, "lacks target.normalisation (the mean and std that turn the network's "
                         "output into metres)", RESTORE_CARD)
    for key in ("mean", "std"):
        if key not in norm:
            raise InputError(card_path, f"lacks target.normalisation.{key} (needed to turn the network's "
                             "output into metres)", RESTORE_CARD)
        if not _is_number(norm[key]):
            raise bad(f"target.normalisation.{key}", norm[key], "a finite number (metres)")
    if norm["std"] <= 0:
        raise bad("target.normalisation.std", norm["std"], "positive (metres)")
    inference = card.get("inference", {})
    if not isinstance(inference, dict):
        raise bad("inference", inference, "an object (tile, overlap)")
    for key, low in (("tile", 1), ("overlap", 0), ("context", 0)):
        if key in inference and not (_is_int(inference[key]) and inference[key] >= low):
            raise bad(f"inference.{key}", inference[key], f"an integer of at least {low} (pixels)")


def open_package(folder: str | os.PathLike) -> ModelPackage:
    """Validate a model folder's card and files (hashes included) without importing torch."""
    folder = Path(folder)
    if not folder.is_dir():
        if folder.suffix.lower() in PICKLE_SUFFIXES:
            raise InputError(folder, "is a pickled PyTorch checkpoint, which can run arbitrary code when loaded",
                             "Use a model folder with model.safetensors + model.json")
        raise InputError(folder, "is not a model folder", "Give the folder holding model.json and model.safetensors")
    card = read_card(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        hint = f" (found pickled {', '.join(pickles)}, which is never loaded)" if pickles else ""
        raise InputError(folder, f"has no {WEIGHTS_FILE}{hint}", "Export the weights as safetensors")
    expected = card.get("weights", {}).get("sha256")
    if expected and expected != _sha256(weights):
        raise InputError(weights, "does not match the hash in model.json (corrupt or replaced)",
                         "Re-copy the model folder")
    check_weights(weights, card)
    graph = folder / ONNX_FILE
    expected = card.get("onnx", {}).get("sha256")
    if graph.is_file() and expected and expected != _sha256(graph):
        raise InputError(graph, "does not match the hash in model.json (corrupt or replaced)",
                         "Re-copy the model folder, or re-export it: alphaearth-height export-onnx --model FOLDER")
    return ModelPackage(module=None, card=card, path=folder)


def read_weights_header(weights: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors header, after checking the file is whole.

    Reads the header only (no torch): a truncated, garbage or inconsistent file gets one line.
    """
    size = weights.stat().st_size
    try:
        base, header = safetensors_layout(weights)
    except (struct.error, ValueError, UnicodeDecodeError, MemoryError, OverflowError) as exc:
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise InputError(weights, f"is not a safetensors file (its header cannot be read: {reason})",
                         "Re-copy the model folder") from None
    if not isinstance(header, dict) or base > size:
        raise InputError(weights, "is not a safetensors file (no valid header)", "Re-copy the model folder")
    tensors, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            count = math.prod(int(d) for d in shape)
            valid = dtype in SAFETENSORS_DTYPES and 0 <= begin <= stop and stop - begin == count * \
                SAFETENSORS_DTYPES[dtype]
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise InputError(weights, f"has a corrupt entry for tensor '{name}'", "Re-copy the model folder")
        tensors[name] = (dtype, tuple(int(d) for d in shape))
        end = max(end, stop)
    if base + end > size:
        raise InputError(weights, f"is truncated ({size:,} bytes, but its header describes {base + end:,})",
                         "Re-copy the model folder")
    return tensors


def _decoder_row(tensors: dict, arch: str) -> dict[int, int]:
    """Output channels of the decoder's top-row blocks (stage -> channels), from the weights' names."""
    pattern = r"decoder\.blocks\.x_0_(\d+)\.conv2\.0\.weight" if arch == "unetplusplus" \
        else r"decoder\.blocks\.(\d+)\.conv2\.0\.weight"
    return {int(m.group(1)): shape[0] for name, (_, shape) in tensors.items()
            if (m := re.fullmatch(pattern, name)) and shape}


def check_weights(weights: Path, card: dict[str, Any]) -> None:
    """The safetensors header against the card: architecture, decoder channels, input bands, output.

    Only names and shapes are read, never the tensors, and no network is built, so a card
    that does not fit its weights is refused cheaply on the ONNX path too.
    """
    tensors = read_weights_header(weights)
    config = card["model"]
    arch, channels = config["architecture"], list(config["decoder_channels"])

    def mismatch(what: str) -> InputError:
        return InputError(weights, f"does not match model.json: {what}", "Use the card that was saved with these weights")

    head = tensors.get("segmentation_head.0.weight")
    if head is None or len(head[1]) != 4:
        raise InputError(weights, "holds no segmentation head (segmentation_head.0.weight): it is not the "
                         "weights of an AlphaEarth Height model", "Re-copy the model folder")
    kinds = {"unet": _decoder_row(tensors, "unet"), "unetplusplus": _decoder_row(tensors, "unetplusplus")}
    found = kinds[arch]
    if not found:
        other = next((name for name, row in kinds.items() if row), None)
        raise mismatch(f"the card says architecture {arch} but the weights are "
                       f"{'a ' + other if other else 'of another architecture'}")
    row = [found.get(i) for i in range(max(found) + 1)]
    if row != channels:
        raise mismatch(f"the card says decoder_channels {channels} but the weights have {row}")
    if head[1][:2] != (int(config["classes"]), channels[-1]):
        raise mismatch(f"the card says {config['classes']} output from {channels[-1]} channels but the "
                       f"segmentation head takes {head[1][1]} and gives {head[1][0]}")
    stem = tensors.get("encoder.conv1.weight")  # ResNet-style encoders; others are checked when torch builds them
    if stem is not None and len(stem[1]) == 4 and stem[1][1] != config["in_channels"]:
        raise mismatch(f"the card says in_channels {config['in_channels']} but the weights take "
                       f"{stem[1][1]} input bands")


def load_model(folder: str | os.PathLike | ModelPackage) -> ModelPackage:
    """Load and validate a model folder with its torch module; the weights must match the card exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    package = folder if isinstance(folder, ModelPackage) else open_package(folder)
    if package.module is not None:
        return package
    folder, card, weights = package.path, package.card, package.path / WEIGHTS_FILE
    import torch

    # Shapes first, on the meta device (no memory): a card that does not fit its weights is
    # refused before the network is allocated.
    with torch.device("meta"):
        skeleton = build_model(card["model"])
    header = {name: shape for name, (_, shape) in read_weights_header(weights).items()}
    _compare_shapes(weights, {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, header)
    del skeleton
    module = build_model(card["model"])
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise InputError(weights, f"cannot be read ({exc})", "Re-copy the model folder") from None
    _compare_shapes(weights, {k: tuple(v.shape) for k, v in module.state_dict().items()},
                    {k: tuple(v.shape) for k, v in state.items()})
    module.load_state_dict(state, strict=True)
    module.eval()
    return ModelPackage(module=module, card=card, path=folder)


def _compare_shapes(weights: Path, expected_shapes: dict, found_shapes: dict) -> None:
    if expected_shapes != found_shapes:
        missing = len(expected_shapes.keys() - found_shapes.keys())
        unexpected = len(found_shapes.keys() - expected_shapes.keys())
        reshaped = sum(1 for k in expected_shapes.keys() & found_shapes.keys() if expected_shapes[k] != found_shapes[k])
        raise InputError(weights, "does not match the architecture in model.json "
                         f"({missing} missing, {unexpected} unexpected, {reshaped} mis-shaped tensors)",
                         "Use the card that was saved with these weights")


def safetensors_layout(path: Path) -> tuple[int, dict[str, Any]]:
    """Byte offset of the data section and the header (name -> dtype, shape, data_offsets)."""
    with open(path, "rb") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        if size > os.fstat(fh.fileno()).st_size - 8:
            raise ValueError(f"header of {size} bytes is longer than the file")
        header = json.loads(fh.read(size))
    return 8 + size, header


def export_onnx(folder: str | os.PathLike) -> Path:
    """Write ``model.onnx`` beside the weights, sharing them, and record it in the card.

    Batch norm is not folded at export (the weights must stay those of the safetensors
    file); ONNX Runtime fuses it when it loads the graph, so inference pays nothing.
    """
    import onnx
    import torch

    package = load_model(folder)
    module = package.module.eval()
    sample = torch.zeros(1, int(package.card["model"]["in_channels"]), package.multiple * 4, package.multiple * 4)
    graph_path = package.path / ONNX_FILE
    tmp = graph_path.with_name(f".{ONNX_FILE}.partial")
    axes = {0: "batch", 2: "rows", 3: "cols"}
    try:
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated, still the one without onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(module, sample, str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                              do_constant_folding=False, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                              dynamic_axes={ONNX_INPUT: axes, ONNX_OUTPUT: axes})
        graph = onnx.load(str(tmp))
        _point_into_safetensors(graph, package.path / WEIGHTS_FILE)
        onnx.save(graph, str(tmp))
        os.replace(tmp, graph_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    card = dict(package.card)
    card["onnx"] = {"file": ONNX_FILE, "sha256": _sha256(graph_path), "opset": ONNX_OPSET,
                    "weights": f"external data in {WEIGHTS_FILE}", "onnx": onnx.__version__}
    (package.path / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return graph_path


def _point_into_safetensors(graph: Any, weights: Path) -> None:
    """Replace each initializer that is a saved tensor by a reference to its bytes in ``weights``."""
    from onnx import TensorProto

    base, header = safetensors_layout(weights)
    for tensor in graph.graph.initializer:
        entry = header.get(tensor.name)
        if not entry or entry["dtype"] != "F32" or list(entry["shape"]) != list(tensor.dims) \
                or tensor.data_type != TensorProto.FLOAT:
            continue  # not a saved weight (an export-made constant): stays inside the graph
        begin, end = entry["data_offsets"]
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", weights.name), ("offset", str(base + begin)), ("length", str(end - begin))):
            item = tensor.external_data.add()
            item.key, item.value = key, value


def onnx_export_available() -> bool:
    return importlib.util.find_spec("onnx") is not None


def bundled_model_dir() -> Path:
    """The model shipped with the plugin, trained on the synthetic demo scene (package data)."""
    from .package_data import resource

    return resource("models", "demo-unetplusplus")
