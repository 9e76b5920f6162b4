"""Several processes under torchrun (DDP, gloo on the CPU) follow one process's loss curve."""

import csv
import json
import os
import subprocess
import sys

import pytest

TINY = ["--arch", "unet", "--encoder-depth", "3", "--decoder-channels", "16,16,8", "--patch-size", "64",
        "--batch-size", "2", "--epochs", "2", "--steps-per-epoch", "3", "--no-calibration", "--workers", "0",
        "--device", "cpu", "--seed", "3"]


def train(small_scene, out, launcher: list, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, "-m", "alphaearth_height.cli", "train", "--embeddings",
                           str(small_scene.embeddings), "--reference", str(small_scene.reference), "--out", str(out),
                           *TINY, *extra], capture_output=True, text=True, timeout=600, env=env)


def history(folder) -> list[dict]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(open(folder / "history.csv"))]


def test_two_processes_match_one_with_the_same_global_batch(small_scene, tmp_path):
    """2 ranks x batch 2 against 1 process x batch 2 x accumulate 2: the same patches, the same
    averaged gradient, so the same training loss per epoch; rank 0 alone writes the run folder."""
    ddp = train(small_scene, tmp_path / "ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = train(small_scene, tmp_path / "single", [], "--accumulate", "2")
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = history(tmp_path / "ddp"), history(tmp_path / "single")
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-9)
    card = json.loads((tmp_path / "ddp" / "model.json").read_text())
    assert card["training"]["epochs_run"] == 2 and (tmp_path / "ddp" / "evaluation" / "report.json").is_file()
    assert ddp.stdout.count("epoch   1/2") == 1  # one voice: rank 0 logs
