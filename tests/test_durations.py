"""ltexp/durations.py: durations and checkpoint cadences as the command line gives them, parsed
without torch (the configuration checks them at parse time)."""

import subprocess
import sys

import pytest

from ltexp import LtexpError
from ltexp.durations import Every, parse_duration


def test_durations_in_seconds_minutes_and_hours():
    assert [parse_duration(t) for t in ("90", "90s", "15m", "15min", "2h", "1.5m")] == [90, 90, 900, 900, 7200, 90]
    with pytest.raises(LtexpError, match="--older-than 'soon' is not a duration: use e.g. 900, 900s, 15m or 2h"):
        parse_duration("soon")


def test_checkpoint_every_parses_epochs_and_time():
    assert Every.parse("3") == Every(epochs=3)
    assert Every.parse("10m") == Every(seconds=600.0)
    assert not Every.parse("0").enabled
    with pytest.raises(LtexpError, match="--checkpoint-every 'often'"):
        Every.parse("often")


def test_durations_import_no_torch():
    code = "import sys, ltexp.durations; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
