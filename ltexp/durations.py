"""Durations and checkpoint cadences as the command line gives them (`--older-than 15m`,
`--checkpoint-every 5` or `10m`): torch-free, so the configuration can check them at parse time."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ltexp import LtexpError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*$")


def parse_duration(text: str, flag: str = "--older-than") -> float:
    """`90`, `90s`, `15m`, `2h` -> seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise LtexpError(f"{flag} {text!r} is not a duration: use e.g. 900, 900s, 15m or 2h")
    unit = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * unit


@dataclass(frozen=True)
class Every:
    """How often to checkpoint: every `epochs` epochs, or every `seconds` of wall time (0 = never)."""

    epochs: int = 0
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Every":
        """`5` = every 5 epochs, `10m` / `30s` / `1h` = at the first epoch end after that much time, `0` = off."""
        text = str(text).strip()
        if re.fullmatch(r"\d+", text):
            return cls(epochs=int(text))
        if text.endswith(("s", "m", "h", "min")):
            try:
                return cls(seconds=parse_duration(text, "--checkpoint-every"))
            except LtexpError:
                pass
        raise LtexpError(f"--checkpoint-every {text!r}: give epochs (e.g. 5), a time (e.g. 10m, 30s) or 0 (off)")

    @property
    def enabled(self) -> bool:
        return self.epochs > 0 or self.seconds > 0
