"""Progress for people: tqdm bars on a terminal, concise lines elsewhere.

`mlflow run`, CI logs and `nohup` redirect output, where a bar is noise; there a line is printed
per epoch at most every `LINE_EVERY_S` seconds (and always for a stage's first and last epoch):

    [head] train 12/100  loss 0.532  val_acc 0.871  1,234 img/s  ETA 0:42

and a study or grid prints a line per trial or cell finished (`CountProgress`):

    tune 2/5 trials done, ETA 0:03: trial 1 COMPLETE val_acc 0.1950 (best 0.1950, trial 1)
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

LINE_EVERY_S = 5.0  # seconds between progress lines when output is not a terminal


def _clock(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Reports the epochs of one model's stages; `expert` names the model (e.g. `head`, `all`)."""

    def __init__(self, expert: str, stream: TextIO | None = None, tty: bool | None = None):
        self.expert = expert
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._bar = None
        self._last_line = -float("inf")
        self._stage_started = 0.0

    def start_stage(self, stage: str, epochs: int) -> None:
        self._stage_started = time.perf_counter()
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=epochs, desc=f"{self.expert} {stage}", unit="epoch", leave=True,
                             dynamic_ncols=True, file=self.stream)

    def end_epoch(self, stage: str, epoch: int, epochs: int, record: dict) -> None:
        """After stage epoch `epoch` of `epochs`; `record` holds train_loss, val_acc, images_per_s."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_acc=f"{record.get('val_acc', float('nan')):.3f}",
                                  img_s=f"{record.get('epoch_images_per_s', 0):,.0f}", refresh=False)
            self._bar.update()
            if epoch == epochs:
                self._bar.close()
                self._bar = None
            return
        now = time.perf_counter()
        if epoch in (1, epochs) or now - self._last_line >= LINE_EVERY_S:
            self._last_line = now
            eta = (now - self._stage_started) / epoch * (epochs - epoch)
            print(f"[{self.expert}] {stage} {epoch}/{epochs}  loss {record['train_loss']:.3f}  "
                  f"val_acc {record.get('val_acc', float('nan')):.3f}  "
                  f"{record.get('epoch_images_per_s', 0):,.0f} img/s  ETA {_clock(eta)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class CountProgress:
    """Items done / total with an ETA (grid cells, study trials): a tqdm bar on a terminal, one
    line per item otherwise. `done` counts items finished before this process started (a resumed
    grid or study); the ETA uses only the rate of the items this process has seen finish."""

    def __init__(self, name: str, unit: str, total: int, done: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, tty: bool | None = None):
        self.name, self.unit, self.total = name, unit, total
        self.start_done, self.started, self.enabled = done, time.perf_counter(), enabled
        self.stream = stream or sys.stderr
        self.bar = None
        if enabled and (self.stream.isatty() if tty is None else tty):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit=unit, desc=name, dynamic_ncols=True, file=self.stream)

    def eta(self, done: int) -> str:
        """Time left at the rate seen so far; `?` before the first item of this process."""
        finished_now = done - self.start_done
        if done >= self.total:
            return _clock(0)
        if finished_now <= 0:
            return "?"
        return _clock((time.perf_counter() - self.started) / finished_now * (self.total - done))

    def update(self, done: int, message: str) -> None:
        """`done` items are finished now (all workers' together); `message` says what just ended."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(message[:60])
        else:
            print(f"{self.name} {done}/{self.total} {self.unit}s done, ETA {self.eta(done)}: {message}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
