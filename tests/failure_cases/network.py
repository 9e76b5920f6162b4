"""Network faults against servers on 127.0.0.1: silence, trickles, wrong answers."""

from __future__ import annotations

CASES: list = []
