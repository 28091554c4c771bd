"""Take the README screenshot docs/compare-methods.png of a real `mlflow ui`: the chart view of an
experiment's runs, comparing the long-tail methods of `python bench/compare.py`.

The script starts `mlflow server` on the store itself (read only: it writes nothing to the store,
the UI's settings live in the browser's local storage of a fresh headless Chromium), opens the
experiment's runs page filtered to `tags.ltexp.role = 'experiment'` in the chart view, closes the
MLflow Assistant panel, widens the runs list, shows all runs in the charts (MLflow shows only the
first 10 by default), keeps only the charts test_acc, test_head_acc and test_tail_acc (the chart
search takes a regular expression), groups the runs by `params.method` and `params.expert_mode`
(one bar per method and split design, the mean over its seeds), folds the groups so the list is
the charts' legend and gives each group a colour of its own, waits for the charts to render,
takes the picture and stops the server (also on error).

Needs Python playwright (`pip install playwright`; no browser download: it drives the system
Chromium, `--chromium`). Example, after `python bench/compare.py` wrote its 36 runs:

    python bench/ui_screenshot.py --tracking-uri sqlite:////tmp/shot/mlflow.db
    python bench/ui_screenshot.py --tracking-uri sqlite:///mlflow.db --group-by "" --out /tmp/per-run.png
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
FILTER = "tags.`ltexp.role` = 'experiment'"
CHARTS = "^test_(head_|tail_)?acc$"
# Twelve colours told apart on screen (matplotlib's tab10, then two of tab20's light ones).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78")


def start_server(tracking_uri: str, artifact_root: str, port: int, log) -> subprocess.Popen:
    """`mlflow server` in its own process group (it forks workers), once it answers /health."""
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
                             "--default-artifact-root", artifact_root, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited with {proc.returncode}; its log: {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"mlflow server did not answer on port {port} in 120 s; its log: {log.name}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def screenshot(url: str, out: Path, *, chromium: str, charts: str, group_by: str, table_width: int,
               settle: float) -> str:
    """Drive the runs page at `url` and save the picture; returns the page's "N matching runs"."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 760}, device_scale_factor=1)
            page.goto(url)
            eye = page.locator('[data-testid="experiment-view-runs-visibility-column-header"]')
            eye.wait_for(timeout=60_000)
            close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
            if close.count():
                close.first.click()
            if table_width:  # drag the runs list's right edge, so group and run names show whole
                pane = page.locator(".react-resizable").first
                box = pane.bounding_box()
                page.mouse.move(box["x"] + box["width"] - 1, box["y"] + 300)
                page.mouse.down()
                page.mouse.move(box["x"] + table_width, box["y"] + 300, steps=10)
                page.mouse.up()
            eye.click()
            page.get_by_role("menu").get_by_text("Show all runs", exact=True).click()
            if charts:
                page.get_by_placeholder("Search metric charts").fill(charts)
            for number, key in enumerate(k for k in group_by.split(",") if k):
                page.get_by_role("button", name="Group by" if number == 0 else re.compile(r"^Group by:")).click()
                page.get_by_placeholder("Search").last.fill(key)
                # The menu lists tags first, then params: take the param of that name.
                page.get_by_role("menuitemcheckbox", name=key, exact=True).last.click()
                page.keyboard.press("Escape")
            if group_by:  # fold every group: the list becomes the charts' legend, one colour per group
                for _ in range(100):
                    # an unfolded group's chevron points down (this SVG path); a folded one's right
                    down = page.locator('span[role="button"].anticon:has(path[d^="M8 8.917"])')
                    if not down.count():
                        break
                    down.first.click()
                # MLflow colours a group by a hash of its name, and 12 groups share a few colours:
                # give each folded group one of PALETTE's (the colour picker the list offers)
                for colour, picker in zip(PALETTE, page.locator('input[type="color"]').all()):
                    picker.fill(colour, force=True)  # the input itself is hidden behind its swatch
            page.mouse.move(5, 755)  # no hover tooltip or plotly toolbar in the picture
            time.sleep(settle)
            matching = page.get_by_text("matching runs").first.inner_text()
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=False)
            return matching
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True, help="the store, e.g. sqlite:////tmp/shot/mlflow.db")
    parser.add_argument("--experiment", default="compare", help="experiment name (default: compare)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "compare-methods.png",
                        help="the picture (default: docs/compare-methods.png)")
    parser.add_argument("--port", type=int, default=5077, help="port of the mlflow server started (default: 5077)")
    parser.add_argument("--artifact-root", default=None,
                        help="--default-artifact-root of the server (default: mlruns beside a sqlite store, "
                             "else a temporary folder); only for artifact pages, not in the picture")
    parser.add_argument("--charts", default=CHARTS, help=f"chart search, a regular expression (default: {CHARTS}; "
                                                         "'' for all charts)")
    parser.add_argument("--group-by", default="method,expert_mode",
                        help="params to group runs by, comma-separated (default: method,expert_mode: one bar per "
                             "method and split design, the mean over its seeds; '' for one bar per run)")
    parser.add_argument("--table-width", type=int, default=560,
                        help="width of the runs list in pixels (default: 560; 0: MLflow's)")
    parser.add_argument("--settle", type=float, default=8.0, help="seconds to let the charts render (default: 8)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary (default: /usr/bin/chromium)")
    args = parser.parse_args(argv)

    artifact_root = args.artifact_root
    if artifact_root is None:
        db = args.tracking_uri.removeprefix("sqlite:///") if args.tracking_uri.startswith("sqlite:///") else None
        beside = Path(db).parent / "mlruns" if db else None
        artifact_root = str(beside) if beside and beside.is_dir() else tempfile.mkdtemp(prefix="ui_screenshot-")

    with tempfile.NamedTemporaryFile("w", prefix="mlflow-server-", suffix=".log", delete=False) as log:
        server = start_server(args.tracking_uri, artifact_root, args.port, log)
        try:
            base = f"http://127.0.0.1:{args.port}"
            experiment = MlflowClient(tracking_uri=base).get_experiment_by_name(args.experiment)
            if experiment is None:
                raise SystemExit(f"no experiment {args.experiment!r} in {args.tracking_uri}")
            query = urllib.parse.urlencode({"searchFilter": FILTER, "compareRunsMode": "CHART"},
                                           quote_via=urllib.parse.quote)
            url = f"{base}/#/experiments/{experiment.experiment_id}/runs?{query}"
            matching = screenshot(url, args.out, chromium=args.chromium, charts=args.charts,
                                  group_by=args.group_by, table_width=args.table_width, settle=args.settle)
        finally:
            stop_server(server)
    print(f"{args.out}: {url} ({matching}; charts {args.charts!r}; group by {args.group_by or 'none'!r})")


if __name__ == "__main__":
    main()
