"""Several processes under torchrun (DDP, gloo on the CPU) follow one process's loss curve, and
a run interrupted under torchrun resumes under torchrun to the uninterrupted run's result."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

TINY = ["--arch", "unet", "--encoder-depth", "3", "--decoder-channels", "16,16,8", "--patch-size", "64",
        "--batch-size", "2", "--epochs", "2", "--steps-per-epoch", "3", "--no-calibration", "--workers", "0",
        "--device", "cpu", "--seed", "3"]
# --local-addr: the rendezvous on 127.0.0.1, also where the hostname does not resolve (chroots, containers)
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--local-addr=127.0.0.1", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(small_scene, out, launcher: list, *extra: str) -> list[str]:
    return [sys.executable, *launcher, "-m", "alphaearth_height.cli", "train", "--embeddings",
            str(small_scene.embeddings), "--reference", str(small_scene.reference), "--out", str(out), *TINY, *extra]


def train(small_scene, out, launcher: list, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(small_scene, out, launcher, *extra), capture_output=True, text=True, timeout=600,
                          env=ENV)


def history(folder) -> list[dict]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(open(folder / "history.csv"))]


def files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def ddp_run(small_scene, tmp_path_factory):
    """An uninterrupted 2-process run of TINY's 2 epochs."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = train(small_scene, out, TORCHRUN)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out


def test_two_processes_match_one_with_the_same_global_batch(small_scene, ddp_run, tmp_path):
    """2 ranks x batch 2 against 1 process x batch 2 x accumulate 2: the same patches, the same
    averaged gradient, so the same training loss per epoch; rank 0 alone writes the run folder."""
    ddp, folder = ddp_run
    single = train(small_scene, tmp_path / "single", [], "--accumulate", "2")
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = history(folder), history(tmp_path / "single")
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-9)
    card = json.loads((folder / "model.json").read_text())
    assert card["training"]["epochs_run"] == 2 and (folder / "evaluation" / "report.json").is_file()
    assert ddp.stdout.count("epoch   1/2") == 1  # one voice: rank 0 logs


def interrupt_after_first_epoch(argv: list[str], out, log) -> int:
    """Start ``argv`` in its own process group and press Ctrl-C (SIGINT to the whole group, as a
    terminal does) as soon as the epoch-1 checkpoint is on disk; the exit status."""
    state = out / "checkpoint" / "state.json"
    with open(log, "w") as fh:
        # niced, so this poller wakes promptly on 2 busy cores: epoch 2 takes a fraction of a second here
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=ENV, start_new_session=True,
                                preexec_fn=lambda: os.nice(10))
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if state.is_file():  # replaced atomically: whole when it is there
                os.killpg(proc.pid, signal.SIGINT)
                break
            time.sleep(0.01)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a second, harder Ctrl-C
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_run_interrupted_under_torchrun_resumes_under_torchrun(small_scene, ddp_run, tmp_path):
    """Ctrl-C after epoch 1 of a 2-process run, then ``torchrun ... train --resume RUN``: the same
    losses, learning rates and weights as the uninterrupted 2-process run; rank 0 alone wrote the
    folder (one row an epoch, one package), and the package loads."""
    from safetensors.torch import load_file

    from alphaearth_height.plugin.core.models import load_model, open_package

    _, whole = ddp_run
    out = tmp_path / "run"
    status = interrupt_after_first_epoch(command(small_scene, out, TORCHRUN), out, tmp_path / "first.log")
    first = (tmp_path / "first.log").read_text()
    assert status != 0, first[-3000:]
    assert not (out / "model.json").exists(), first[-3000:]
    assert first.count(f"continue with: alphaearth-height train --resume {out}") == 1, first[-3000:]  # rank 0's
    stored = json.loads((out / "checkpoint" / "state.json").read_text())
    assert stored["epoch"] == 1 and [row["epoch"] for row in stored["history"]] == [1], first[-3000:]

    resumed = subprocess.run([sys.executable, *TORCHRUN, "-m", "alphaearth_height.cli", "train", "--resume",
                              str(out)], capture_output=True, text=True, timeout=600, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming") == 1 and resumed.stdout.count("epoch   2/2") == 1  # rank 0 logs
    assert "epoch   1/2" not in resumed.stdout  # epoch 1 is not trained again

    a, b = history(out), history(whole)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2]  # one row an epoch: no rank doubled it
    for x, y in zip(a, b):
        for key in ("train_loss", "val_loss"):
            assert x[key] == pytest.approx(y[key], rel=1e-4), (key, x, y)
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-9)
    assert files(out) == files(whole)  # the same folder: one package, no stray per-rank files, checkpoint gone

    package = load_model(open_package(out))
    card = package.card
    assert card["training"]["epochs_run"] == 2 and card["training"]["best_epoch"] == \
        json.loads((whole / "model.json").read_text())["training"]["best_epoch"]
    weights, reference = load_file(str(out / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert weights.keys() == reference.keys() and not any(k.startswith("module.") for k in weights)
    state = package.module.state_dict()
    for name, tensor in reference.items():  # the same weights: the optimiser's moments and step resumed too
        difference = float((weights[name].double() - tensor.double()).abs().max()) if tensor.numel() else 0.0
        assert difference <= 1e-4 * max(1.0, float(tensor.double().abs().max())), (name, difference)
        assert state[name].shape == tensor.shape
