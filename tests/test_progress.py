"""Progress output: epoch lines for a training stage, items-done lines with an ETA for grids and studies."""

import io

from ltexp import progress
from ltexp.progress import CountProgress, Progress


def test_epoch_lines_first_last_and_at_most_every_interval(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 8.0, 9.0])  # start, then the end of epochs 1..4
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    bar = Progress("head", stream=out, tty=False)
    bar.start_stage("train", 4)
    for epoch in range(1, 5):
        bar.end_epoch("train", epoch, 4, {"train_loss": 1.0 / epoch, "val_acc": 0.5, "epoch_images_per_s": 1234.0})
    lines = out.getvalue().splitlines()
    # Epoch 1 (first), epoch 3 (LINE_EVERY_S = 5 s after the last line), epoch 4 (last); not epoch 2.
    assert [line.split()[2] for line in lines] == ["1/4", "3/4", "4/4"]
    assert lines[0] == "[head] train 1/4  loss 1.000  val_acc 0.500  1,234 img/s  ETA 0:03"
    assert lines[1].endswith("ETA 0:03")  # 8 s for 3 epochs: 2.7 s left


def test_count_lines_give_done_total_and_eta_from_this_process_rate(monkeypatch):
    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    bar = CountProgress("tune", "trial", total=10, done=4, stream=out, tty=False)  # 4 done by an earlier session
    bar.update(5, "trial 4 COMPLETE")
    bar.update(7, "trial 6 PRUNED at epoch 2")
    bar.update(10, "trial 9 COMPLETE")
    assert out.getvalue().splitlines() == [
        "tune 5/10 trials done, ETA 0:50: trial 4 COMPLETE",       # 10 s per trial, 5 left
        "tune 7/10 trials done, ETA 0:30: trial 6 PRUNED at epoch 2",  # 30 s for 3 trials, 3 left
        "tune 10/10 trials done, ETA 0:00: trial 9 COMPLETE",
    ]


def test_count_progress_on_a_terminal_is_a_bar_and_disabled_is_silent():
    out = io.StringIO()
    bar = CountProgress("grid", "cell", total=3, stream=out, tty=True)
    bar.update(2, "cell b FINISHED")
    assert bar.bar is not None and bar.bar.n == 2
    bar.close()
    assert "2/3" in out.getvalue() and "cell" in out.getvalue()
    quiet = io.StringIO()
    silent = CountProgress("grid", "cell", total=3, enabled=False, stream=quiet, tty=False)
    silent.update(1, "cell a FINISHED")
    silent.close()
    assert quiet.getvalue() == ""
