"""core.choices is the one list of each choice: the CLI offers exactly it and core refuses the rest."""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys

import pytest

from alphaearth_height.cli import build_parser
from alphaearth_height.plugin.core import choices
from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.fetch import check_year, make_source

# (command, option) -> the list the CLI must offer
OFFERED = {("predict", "--device"): choices.DEVICES, ("predict", "--backend"): choices.BACKENDS,
           ("fetch", "--source"): choices.SOURCES, ("fetch-terrain", "--product"): choices.TERRAIN_PRODUCTS,
           ("train", "--arch"): choices.ARCHITECTURES, ("train", "--loss"): choices.LOSSES,
           ("train", "--schedule"): choices.SCHEDULES, ("train", "--split"): choices.SPLIT_KINDS,
           ("train", "--direction"): choices.DIRECTIONS, ("correct", "--method"): choices.BIAS_METHODS}


def _option_choices(command: str, option: str) -> tuple:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if option in a.option_strings)
    return tuple(action.choices)


@pytest.mark.parametrize("command,option", sorted(OFFERED))
def test_the_cli_offers_the_declared_choices(command, option):
    assert _option_choices(command, option) == OFFERED[(command, option)]


def test_year_range_is_first_year_to_this_year():
    assert check_year(choices.FIRST_YEAR) == choices.FIRST_YEAR
    assert check_year(str(datetime.date.today().year)) == datetime.date.today().year
    with pytest.raises(InputError, match=f"outside the AlphaEarth years \\({choices.FIRST_YEAR}-"):
        check_year(choices.FIRST_YEAR - 1)


def test_core_refuses_an_unknown_name_with_the_list():
    with pytest.raises(InputError, match="Use one of: " + ", ".join(choices.SOURCES)):
        make_source("dropbox")
    with pytest.raises(InputError, match="loss 'hinge'"):
        choices.check_choice("hinge", choices.LOSSES, "loss")


def test_choices_module_imports_nothing_heavy():
    """QGIS imports it while listing the Processing algorithms: no numpy, rasterio or torch."""
    code = ("import sys; import alphaearth_height.plugin.core.choices; "
            "print(sorted(m for m in ('numpy', 'rasterio', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
