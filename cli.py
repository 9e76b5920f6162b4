"""`alphaearth-height`: the command line over the same functions the QGIS plugin calls."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional, Sequence

from .plugin.core.device import DEVICE_CHOICES
from .plugin.core.errors import InputError

PROG = "alphaearth-height"


class _Bar:
    """A tqdm progress bar driven by (done, total) callbacks."""

    def __init__(self, label: str) -> None:
        self.label, self.bar = label, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.label, unit="tile", file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fetch(args: argparse.Namespace) -> None:
    from .plugin.core.aoi import AreaOfInterest
    from .plugin.core.fetch import estimate, fetch, format_estimate

    if args.source == "local" and not args.local_raster:
        raise InputError("--local-raster", "is required with --source local", "Give the embeddings raster to clip")
    if not args.out and not args.estimate_only:
        raise InputError("fetch", "has nowhere to write", "Give --out, or --estimate-only for the size alone")
    aoi = AreaOfInterest(*args.aoi, crs=args.aoi_crs)
    options = {"raster": args.local_raster} if args.source == "local" else {}
    if args.source == "earthengine" and args.project:
        options["project"] = args.project
    if args.source == "cog" and args.base_url:
        options["base_url"] = args.base_url
    print(format_estimate(estimate(aoi, args.year, args.source, cache_dir=args.cache_dir, **options)))
    if args.estimate_only:
        return
    bar = _Bar("fetching")
    try:
        result = fetch(aoi, args.year, args.source, args.out, cache_dir=args.cache_dir, progress=bar, **options)
    finally:
        bar.close()
    print(f"wrote {result.path} ({result.grid.width}x{result.grid.height} px, {result.tiles} tiles: "
          f"{result.fetched} fetched, {result.from_cache} from cache; {result.valid_fraction:.0%} with data; "
          f"{result.seconds:.1f} s)")


def _predict(args: argparse.Namespace) -> None:
    from .plugin.core.inference import predict_height
    from .plugin.core.models import bundled_model_dir

    bar = _Bar("predicting")
    try:
        result = predict_height(args.embeddings, args.model or bundled_model_dir(), args.out, tile=args.tile,
                                overlap=args.overlap, batch_size=args.batch_size, device=args.device,
                                amp=not args.no_amp, progress=bar)
    finally:
        bar.close()
    print(f"wrote {result.path} ({result.grid.width}x{result.grid.height} px, {result.tiles} tiles, "
          f"{result.seconds:.1f} s on {result.device})")


def _compare(args: argparse.Namespace) -> None:
    from .plugin.core.compare import compare_heights
    from .plugin.core.metrics import format_metrics_table, json_safe

    if not args.out and not args.metrics:
        raise InputError("compare", "has nothing to write", "Give --out for the difference raster and/or --metrics")
    metrics = compare_heights(args.predicted, args.reference, args.out, args.metrics)
    print(format_metrics_table({"overall": metrics["overall"]}))
    print(format_metrics_table({f"{b['bin_min']:.0f}-{b['bin_max']:.0f} m": b for b in metrics["bins"]}))
    if args.metrics:
        print(f"metrics written to {args.metrics}")
    if args.json:
        print(json.dumps(json_safe(metrics["overall"])))


def _train(args: argparse.Namespace) -> None:
    from .training.train import TrainConfig, train_model

    channels = [int(c) for c in args.decoder_channels.split(",")] if args.decoder_channels else None
    config = TrainConfig(
        embeddings=args.embeddings, reference=args.reference, out=args.out, arch=args.arch, encoder=args.encoder,
        encoder_depth=args.encoder_depth, decoder_channels=channels, patch_size=args.patch_size,
        batch_size=args.batch_size, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        patience=args.patience, loss=args.loss, lr=args.lr, weight_decay=args.weight_decay,
        test_fraction=args.test_fraction, validation_fraction=args.validation_fraction, direction=args.direction,
        seed=args.seed, device=args.device, name=args.name or "", region=args.region or "", year=args.year)
    train_model(config)


def _demo(args: argparse.Namespace) -> None:
    from .training.demo import run_demo

    if args.scene_only:
        from .plugin.core.demo_scene import generate_demo_scene

        scene = generate_demo_scene(args.out)
        print(f"wrote {scene.embeddings} and {scene.reference}")
        return
    bar = _Bar("predicting")
    try:
        result = run_demo(args.out, model=args.model, device=args.device, progress=bar)
    finally:
        bar.close()
    print()
    print("Accuracy on the synthetic demo scene (heights in m; diff = predicted - reference):")
    print(result.table)
    print(f"\noutputs in {result.out_dir}/: embeddings.tif, reference_dsm.tif, predicted_height.tif, "
          "difference.tif, metrics.json, height_maps.png")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="where the model runs (auto: CUDA, then Apple MPS, then CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Surface height at 10 m from AlphaEarth embeddings.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="fetch AlphaEarth embeddings for an area and year (prints the size first)")
    p.add_argument("--source", required=True, choices=("earthengine", "cog", "local"),
                   help="earthengine (needs an account and Cloud project), cog (public COGs, no account) "
                        "or local (clip/warp a raster on disk)")
    p.add_argument("--aoi", required=True, nargs=4, type=float, metavar=("XMIN", "YMIN", "XMAX", "YMAX"),
                   help="area of interest in --aoi-crs")
    p.add_argument("--aoi-crs", default="EPSG:4326", help="CRS of --aoi (default EPSG:4326)")
    p.add_argument("--year", required=True, type=int, help="embedding year (2017 onwards)")
    p.add_argument("--out", help="output embeddings GeoTIFF (AEF int8, 64 bands)")
    p.add_argument("--local-raster", help="embeddings raster for --source local")
    p.add_argument("--project", help="Google Cloud project for --source earthengine "
                                     "(default: $EARTHENGINE_PROJECT or the one stored by earthengine)")
    p.add_argument("--base-url", help="COG mirror for --source cog (default: Source Cooperative)")
    p.add_argument("--cache-dir", help="tile cache (default: $ALPHAEARTH_HEIGHT_CACHE or ~/.cache/alphaearth_height)")
    p.add_argument("--estimate-only", action="store_true", help="print the size estimate and stop")
    p.set_defaults(run=_fetch)

    p = sub.add_parser("predict", help="predict a height raster from an embeddings raster")
    p.add_argument("--embeddings", required=True, help="64-band embeddings GeoTIFF (AEF int8 or float)")
    p.add_argument("--model", help="model folder (model.json + model.safetensors); default: the bundled model")
    p.add_argument("--out", required=True, help="output height GeoTIFF")
    p.add_argument("--tile", type=int, help="tile size in pixels (default: the model card's)")
    p.add_argument("--overlap", type=int, help="overlap between tiles in pixels (default: the model card's)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    p.add_argument("--no-amp", action="store_true", help="full precision on CUDA (AMP is on by default there)")
    _add_device(p)
    p.set_defaults(run=_predict)

    p = sub.add_parser("compare", help="difference raster and accuracy figures against a reference DSM")
    p.add_argument("--predicted", required=True, help="predicted height GeoTIFF")
    p.add_argument("--reference", required=True, help="reference DSM (any CRS and resolution)")
    p.add_argument("--out", help="output difference GeoTIFF (predicted - reference)")
    p.add_argument("--metrics", help="output metrics JSON")
    p.add_argument("--json", action="store_true", help="also print the overall metrics as one JSON line")
    p.set_defaults(run=_compare)

    p = sub.add_parser("train", help="train a U-Net / U-Net++ height model")
    p.add_argument("--embeddings", required=True, help="64-band embeddings GeoTIFF")
    p.add_argument("--reference", required=True, help="reference DSM (any CRS and resolution)")
    p.add_argument("--out", required=True, help="new folder for the model package")
    p.add_argument("--arch", default="unetplusplus", choices=("unet", "unetplusplus"))
    p.add_argument("--encoder", default="resnet18", help="any segmentation-models-pytorch encoder")
    p.add_argument("--encoder-depth", type=int, default=5, help="encoder stages, 3-5 (default 5)")
    p.add_argument("--decoder-channels", help="comma-separated, one per encoder stage")
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--patience", type=int, default=6, help="epochs without validation gain before stopping")
    p.add_argument("--loss", default="mse", choices=("mse", "huber"))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--direction", default="east", choices=("east", "west", "north", "south"),
                   help="side of the scene held out for testing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="model name written into the card")
    p.add_argument("--region", help="training region written into the card")
    p.add_argument("--year", type=int, help="embedding year written into the card")
    _add_device(p)
    p.set_defaults(run=_train)

    p = sub.add_parser("demo", help="run the whole pipeline on the embedded synthetic scene")
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--model", help="model folder; default: the bundled model")
    p.add_argument("--scene-only", action="store_true", help="only write the synthetic scene (for training)")
    _add_device(p)
    p.set_defaults(run=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
