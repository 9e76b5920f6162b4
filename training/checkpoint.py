"""Resumable training state without pickle: tensors (model, best model, optimiser moments,
torch RNG) in safetensors, everything else (epoch, history, numpy RNG, scheduler) in JSON.

Both files are replaced atomically each epoch; the JSON names the epoch stored in the
tensors' metadata so a torn pair is detected rather than silently mixed.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from ..plugin.core.errors import InputError
from ..plugin.core.rasters import DISK_FULL_ERRNOS, disk_full_error

FOLDER = "checkpoint"
TENSORS = "state.safetensors"
STATE = "state.json"


def save_checkpoint(run_dir: Path, model, best_state: dict, optimiser, state: dict) -> None:
    """Write the run's state after an epoch (``state`` must be JSON-able and hold 'epoch')."""
    import torch
    from safetensors.torch import save_file

    folder = Path(run_dir) / FOLDER
    folder.mkdir(exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best_state.items()})
    opt = optimiser.state_dict()
    for index, moments in opt["state"].items():
        tensors.update({f"opt.{index}.{name}": torch.as_tensor(value) for name, value in moments.items()})
    tensors["torch_rng"] = torch.get_rng_state()
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    epoch = str(state["epoch"])
    record = dict(state, optimiser_groups=opt["param_groups"])
    tensors_tmp, state_tmp = folder / (TENSORS + ".partial"), folder / (STATE + ".partial")
    try:  # both written in full before either replaces the last good pair (a full disk keeps that one)
        save_file(tensors, str(tensors_tmp), metadata={"epoch": epoch})
        state_tmp.write_text(json.dumps(record, indent=1) + "\n")
    except Exception as exc:  # noqa: BLE001 - safetensors wraps OS errors in its own type
        for tmp in (tensors_tmp, state_tmp):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(folder, too_large=exc.errno == errno.EFBIG) from None
        if "no space left" in str(exc).lower() or "file too large" in str(exc).lower():
            raise disk_full_error(folder, too_large="too large" in str(exc).lower()) from None
        raise
    os.replace(tensors_tmp, folder / TENSORS)
    os.replace(state_tmp, folder / STATE)


def load_checkpoint(run_dir: Path, model, optimiser) -> tuple[dict, dict]:
    """Restore model, optimiser and torch RNG in place; return (state, best model tensors)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(run_dir) / FOLDER
    if not (folder / STATE).is_file() or not (folder / TENSORS).is_file():
        raise InputError(run_dir, "has no checkpoint to resume from",
                         "Give a run folder written by 'alphaearth-height train' that was interrupted")
    try:
        state = json.loads((folder / STATE).read_text())
        epoch = str(state["epoch"])
    except (ValueError, KeyError, TypeError) as exc:
        raise _damaged(folder / STATE, exc) from None
    try:
        with safe_open(str(folder / TENSORS), "pt") as fh:
            stored_epoch = (fh.metadata() or {}).get("epoch")
        if stored_epoch != epoch:
            raise InputError(folder, "holds tensors and state of different epochs", "Delete the run and start again")
        tensors = load_file(str(folder / TENSORS))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a short or bad file
        raise _damaged(folder / TENSORS, exc) from None
    try:
        model.load_state_dict(_section(tensors, "model."))
        optimiser.load_state_dict(_optimiser_state(tensors, state.pop("optimiser_groups")))
        torch.set_rng_state(tensors["torch_rng"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise _damaged(folder / TENSORS, exc) from None
    return state, _section(tensors, "best.")


def _damaged(path: Path, exc: BaseException) -> InputError:
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return InputError(path, f"is truncated or damaged and cannot be resumed from ({reason})",
                      "Start the run again into a new folder (the checkpoint of an interrupted save is lost)")


def _section(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optimiser_state(tensors: dict, groups: list[dict[str, Any]]) -> dict:
    state: dict[int, dict] = {}
    for key, value in _section(tensors, "opt.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}
