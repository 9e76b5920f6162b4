"""The bad-input and fault matrix, one module per area; tests/test_failure_matrix.py runs every case.

A case builds its bad inputs (and any earlier output that must survive) in a
``Workspace`` and gives the command line; the runner checks what every case promises:
the exit code, one line naming the input, the problem and the fix, no new file or
partial left behind, and earlier outputs byte-identical. Cases with ``processing`` also
run through ``processing.run`` and must fail there as a Processing error.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
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
    mounted: list = field(default_factory=list)       # mount points to unmount when the case ends
    file_size_limit: Optional[int] = None              # RLIMIT_FSIZE for the child (no small filesystem)

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

    # ---- small and read-only filesystems ------------------------------------------------------
    #
    # A real small filesystem (a tmpfs mounted on ws.out) where the sandbox allows mounts
    # (root); otherwise a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the child's
    # writes fail with EFBIG, and cases that need a real one are skipped with the reason.

    def small_disk(self, size: int = 1 << 20) -> bool:
        """Mount a ``size`` byte tmpfs on ws.out (still empty); False where mounting is not allowed."""
        if any(self.out.iterdir()):
            raise RuntimeError("small_disk() must come before anything is written under ws.out")
        if os.geteuid() != 0 or shutil.which("mount") is None:
            return False
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(self.out)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return False
        self.mounted.append(self.out)
        return True

    def fill_disk(self, leave: int) -> None:
        """Fill ws.out's small filesystem with a filler file until ``leave`` bytes are free.

        Without a small filesystem the child gets a file size limit of ``leave`` bytes instead.
        """
        if not self.mounted:
            self.file_size_limit = leave
            return
        free = shutil.disk_usage(self.out).free
        if free < leave:
            raise RuntimeError(f"only {free} bytes free on the small disk, {leave} asked for")
        with open(self.out / "filler", "ab") as fh:
            fh.write(b"\0" * (free - leave))
        left = shutil.disk_usage(self.out).free
        assert abs(left - leave) <= 4096, (left, leave)

    def require_small_disk(self, size: int = 1 << 20) -> None:
        """``small_disk`` or skip: for cases a file size limit cannot stand in for (free-space checks)."""
        import pytest

        if not self.small_disk(size):
            pytest.skip("needs a small filesystem: mounting a tmpfs needs root (or CAP_SYS_ADMIN) here")

    def read_only_out(self) -> None:
        """Make ws.out read-only (with what is already in it): remount the tmpfs, or chmod for non-root."""
        import pytest

        if self.mounted:
            done = subprocess.run(["mount", "-o", "remount,ro", str(self.out)], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot remount the small filesystem read-only: {done.stderr.strip()}")
        elif os.geteuid() != 0:
            os.chmod(self.out, 0o555)
        else:
            pytest.skip("a read-only folder needs a mount as root (root writes through file modes)")

    def child_preexec(self, extra: Optional[Callable[[], None]] = None) -> Optional[Callable[[], None]]:
        """The ``preexec_fn`` for the CLI child: the case's own, plus the file size limit if any."""
        limit = self.file_size_limit
        if limit is None:
            return extra

        def preexec() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            if extra:
                extra()
        return preexec

    def close(self) -> None:
        """Undo mounts and modes (the runner calls this when the case ends)."""
        if os.geteuid() != 0 and self.out.exists():
            os.chmod(self.out, 0o755)
        for point in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        self.mounted.clear()

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
