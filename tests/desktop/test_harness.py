"""The desktop harness itself: a QGIS that crashes must be reported as a crash, not a pass."""

from __future__ import annotations

import signal

from .desktop_harness import describe_signal, make_profile, run_qgis_desktop


def test_a_crashing_qgis_is_caught(release_zip, tmp_path):
    profiles = tmp_path / "profiles"
    make_profile(profiles, release_zip)
    script = tmp_path / "crash.py"
    script.write_text("import os, signal\nfrom qgis.PyQt.QtCore import QTimer\n"
                      "QTimer.singleShot(1000, lambda: os.kill(os.getpid(), signal.SIGSEGV))\n")
    run = run_qgis_desktop(profiles, {}, tmp_path / "artifacts", hard_deadline_s=90, script=script)
    assert not run.reported
    assert run.returncode is not None and run.returncode < 0, describe_signal(run.returncode)
    # QGIS' own SIGSEGV handler prints a backtrace and aborts: SIGABRT; without it, SIGSEGV.
    assert run.returncode in (-signal.SIGSEGV, -signal.SIGABRT), describe_signal(run.returncode)
    assert "QGIS exited before the script reported" in run.notes
