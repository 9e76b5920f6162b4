"""The bad-input and fault matrix (cases in tests/failure_cases/): every case through the CLI,
and the cases that share their inputs with a Processing algorithm through ``processing.run``."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from failure_cases import Case, Workspace, all_cases

CLI = Path(sys.executable).parent / "alphaearth-height"
ONE_LINE = re.compile(r"^alphaearth-height: error: .+: .+\. \S.+$")
CASES = all_cases()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones included) with a hash of its bytes."""
    state = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        state[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@pytest.fixture
def workspace(request, tmp_path, small_scene, tiny_model) -> Workspace:
    ws = Workspace(tmp_path, small_scene, tiny_model)
    request.addfinalizer(ws.resources.close)  # servers a case started stop when it ends
    ws.inputs.mkdir()
    ws.out.mkdir()
    yield ws
    ws.close()


def _mentions(case: Case, ws: Workspace) -> list[str]:
    return [str(m) for m in (case.mentions(ws) if callable(case.mentions) else case.mentions)]


def _changes(before: dict, after: dict, may_write: tuple[str, ...]) -> list[str]:
    changed = [f"{name} changed or removed" for name, digest in before.items() if after.get(name) != digest]
    new = [name for name in after.keys() - before.keys()
           if not any(Path(name).match(pattern) or name.startswith(pattern.rstrip("*")) for pattern in may_write)]
    return changed + [f"{name} left behind" for name in sorted(new)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli(case: Case, workspace: Workspace):
    args = [str(a) for a in case.args(workspace)]
    before = snapshot(workspace.out)
    env = {**os.environ, **case.env}
    started = time.monotonic()
    proc = subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=case.timeout_s,
                          cwd=workspace.root, env=env, preexec_fn=workspace.child_preexec(case.preexec))
    seconds = time.monotonic() - started
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    message = lines[-1] if lines else ""
    assert proc.returncode == case.exit_code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    if case.deadline_s is not None:
        assert seconds <= case.deadline_s, f"ended after {seconds:.1f} s, past its {case.deadline_s} s deadline"
    if case.exit_code == 0:  # a fault to ride out: no error at all
        assert "error:" not in proc.stderr, proc.stderr
    else:
        assert ONE_LINE.match(message), f"not one line naming input, problem and fix: {message!r}"
        for needle in _mentions(case, workspace):
            assert needle.lower() in message.lower(), f"{needle!r} not in {message!r}"
    if case.check is not None:
        case.check(workspace, proc.stdout, proc.stderr)
    assert _changes(before, snapshot(workspace.out), case.may_write) == []


PROCESSING_CASES = [c for c in CASES if c.processing is not None]


@pytest.mark.parametrize("case", PROCESSING_CASES, ids=[c.id for c in PROCESSING_CASES])
def test_processing(case: Case, workspace: Workspace, processing_provider, monkeypatch):
    import processing
    from qgis.core import QgsApplication, QgsProcessingException

    for name, value in case.env.items():  # e.g. shorter network deadlines
        monkeypatch.setenv(name, value)
    case.args(workspace)  # builds the same bad inputs
    if workspace.file_size_limit is not None:
        pytest.skip("a file size limit cannot be given to QGIS's worker process; needs a small filesystem")
    algorithm, params = case.processing(workspace)
    before = snapshot(workspace.out)
    with pytest.raises(QgsProcessingException) as info:
        processing.run(f"alphaearth_height:{algorithm}", params)
    message = str(info.value)
    for needle in _mentions(case, workspace):
        assert needle.lower() in message.lower(), f"{needle!r} not in {message!r}"
    assert "Traceback" not in message
    assert _changes(before, snapshot(workspace.out), case.may_write) == []
    assert QgsApplication.instance() is not None  # QGIS still running
