"""The bad-input and fault matrix, one module per area; tests/test_failure_matrix.py runs every case.

A case builds its bad inputs (and any earlier output that must survive) in a
``Workspace`` and gives the command line; the runner checks what every case promises:
the exit code, one line naming the input, the problem and the fix, no new file or
partial left behind, and earlier outputs byte-identical. Cases with ``processing`` also
run through ``processing.run`` and must fail there as a Processing error.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ArgsFn = Callable[["Workspace"], list]


@dataclass
class Workspace:
    """Inputs (read-only by convention) and the output folder a case writes into."""

    root: Path
    scene: object             # core.demo_scene.DemoScene: .embeddings, .reference, .grid (256 x 256 px)
    model: Path               # a tiny valid model folder (safetensors + card + ONNX graph)
    # what a case starts (a server on 127.0.0.1) and must stop: closed by the runner when the case ends
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    values: dict = field(default_factory=dict)  # set by args(ws) for processing(ws), e.g. a server's URL

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def start(self, resource):
        """Enter a context manager (a server) until the case ends; returns what it gives."""
        return self.resources.enter_context(resource)

    def copy_model(self, name: str = "model") -> Path:
        target = self.inputs / name
        shutil.copytree(self.model, target)
        return target

    def earlier_output(self, name: str, source: Optional[Path] = None) -> Path:
        """A valid file at an output path, as an earlier run would have left it."""
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source or self.scene.reference, path)
        return path


@dataclass(frozen=True)
class Case:
    id: str
    args: ArgsFn                                   # CLI arguments (after alphaearth-height); may set up files
    mentions: Callable[[Workspace], list] | tuple = ()  # substrings the one-line message must contain
    exit_code: int = 2
    may_write: tuple[str, ...] = ()                # globs under ws.out allowed to appear (e.g. a tile cache)
    processing: Optional[Callable[[Workspace], tuple[str, dict]]] = None  # (algorithm id, parameters)
    timeout_s: float = 180.0
    env: dict = field(default_factory=dict)        # for the CLI child, and set during the Processing run
    preexec: Optional[Callable[[], None]] = None   # e.g. resource limits for the child
    # exit_code 0: a fault the command must ride out (no error line; may_write holds its output)
    deadline_s: Optional[float] = None             # documented deadline (+ start-up): the CLI ends by then
    check: Optional[Callable[["Workspace", str, str], None]] = None  # more checks on (ws, stdout, stderr)


def all_cases() -> list[Case]:
    from . import inputs, network, outputs

    return [*inputs.CASES, *outputs.CASES, *network.CASES]
