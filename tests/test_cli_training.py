"""train / evaluate / correct / experiment from the command line, and a trained model in predict."""

import subprocess
import sys
from pathlib import Path

import pytest

CLI = Path(sys.executable).parent / "alphaearth-height"


def run(*args):
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", ["train", "evaluate", "correct", "experiment"])
def test_help(command):
    result = run(command, "--help")
    assert result.returncode == 0 and "usage: alphaearth-height" in result.stdout


def test_train_then_predict_with_uncertainty_and_evaluate(small_scene, tmp_path):
    model = tmp_path / "run"
    result = run("train", "--embeddings", small_scene.embeddings, "--reference", small_scene.reference,
                 "--out", model, "--arch", "unet", "--encoder-depth", "3", "--decoder-channels", "16,16,8",
                 "--patch-size", "64", "--batch-size", "2", "--epochs", "1", "--steps-per-epoch", "2",
                 "--split", "blocks", "--block-size", "64", "--buffer", "4", "--loss", "huber", "--balance",
                 "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert (model / "model.json").is_file() and "ETA" in result.stdout
    height, spread = tmp_path / "h.tif", tmp_path / "u.tif"
    result = run("predict", "--embeddings", small_scene.embeddings, "--model", model, "--out", height,
                 "--uncertainty", spread, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert height.is_file() and spread.is_file()
    report = tmp_path / "report"
    result = run("evaluate", "--model", model, "--embeddings", small_scene.embeddings, "--reference",
                 small_scene.reference, "--out", report, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "ridge test" in result.stdout and (report / "report.md").is_file()
    assert '"kind": "blocks"' in (report / "report.json").read_text()  # the split recorded in the card


def test_train_without_inputs_or_resume_is_one_line(tmp_path):
    result = run("train", "--out", tmp_path / "x")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--embeddings" in result.stderr and not (tmp_path / "x").exists()


def test_train_help_shows_every_default():
    """Each option with a default shows it; the device-dependent ones give both recipes in words."""
    import argparse

    from alphaearth_height.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    formatter = train.formatter_class(prog="x")
    for action in train._actions:
        if action.default in (None, argparse.SUPPRESS) or action.default is False:
            continue
        shown = formatter._get_help_string(action) % {"default": action.default}
        assert f"(default: {action.default})" in shown, action.option_strings
    text = train.format_help()
    for option in ("--patch-size", "--batch-size", "--steps-per-epoch"):
        assert "on a CPU" in " ".join(text.split(option, 2)[2].split()[:25]), option
