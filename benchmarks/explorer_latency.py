"""The atlas explorer's slider-to-image latency, in a real browser on this machine.

Starts `python -m train.feature_atlas serve` on a trained run, opens the feature view of each
of its features in Debian's Chromium (driven by Playwright), drags the first latent slider
across its range in small steps, and times every update from the slider's `input` event to the
new image having loaded on the page (the page records it: `window.atlasExplorer.latencies`);
the server's own time per request (generator, activation on pasted contexts, nearest crops) is
reported beside it. The goal (docs/atlas.md): under 100 ms per update for the default
generator. Also saves a screenshot of the last feature view.

    python -m train.feature_atlas --workdir runs/feature_atlas     # a trained default run
    python benchmarks/explorer_latency.py --workdir runs/feature_atlas \\
        --screenshot docs/images/atlas_explorer.png
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOAL_MS = 100.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/feature_atlas",
                        help="a trained run of python -m train.feature_atlas (default: "
                             "%(default)s)")
    parser.add_argument("--moves", type=int, default=60,
                        help="slider moves per feature (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=0.02,
                        help="seconds between moves, as a quick drag (default: %(default)s)")
    parser.add_argument("--chromium", default="/usr/bin/chromium",
                        help="the browser (default: %(default)s)")
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="save a screenshot of the last feature view here")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drag(page, moves: int, interval: float) -> list[float]:
    """Drag slider z1 from its left end to its right end; the latencies (ms) of the updates it
    caused."""
    page.locator("#z0").fill("-3")
    page.wait_for_timeout(500)
    start = page.evaluate("window.atlasExplorer.latencies.length")
    box = page.locator("#z0").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + 2, y)
    page.mouse.down()
    for k in range(1, moves + 1):
        page.mouse.move(box["x"] + 2 + k * (box["width"] - 4) / moves, y)
        time.sleep(interval)
    page.mouse.up()
    page.wait_for_timeout(1000)
    return page.evaluate(f"window.atlasExplorer.latencies.slice({start})")


def main(argv=None) -> None:
    from playwright.sync_api import sync_playwright

    args = parse_args(argv)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = subprocess.Popen([sys.executable, "-m", "train.feature_atlas", "serve",
                               "--workdir", args.workdir, "--port", str(port)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if f":{port}/" not in line:
            raise SystemExit(f"the explorer did not start: {line}")
        rows = []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium,
                                                 args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("window.atlasExplorer && window.atlasExplorer.ready")
            nodes = page.evaluate("Array.from(document.querySelectorAll('.card'))"
                                  ".map(c => c.dataset.node)")
            for node in nodes:
                page.goto(f"http://127.0.0.1:{port}/#feature={node}")
                page.wait_for_function("window.atlasExplorer.renders >= 1")
                page.wait_for_timeout(300)
                browser_ms = drag(page, args.moves, args.interval)
                server_ms = page.evaluate("window.atlasExplorer.last.server_ms")
                rows.append((node, browser_ms, server_ms))
            if args.screenshot:
                args.screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.screenshot))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)

    print(f"atlas explorer, {args.workdir}: slider input -> new image loaded, {args.moves} "
          f"moves {1000 * args.interval:.0f} ms apart per feature, Chromium headless")
    header = ("feature", "updates", "median ms", "p90 ms", "max ms", "server ms (last)",
              f"median / {GOAL_MS:.0f} ms goal")
    print(" | ".join(header))
    every = []
    for node, browser_ms, server_ms in rows:
        every += browser_ms
        print(f"{node} | {len(browser_ms)} | {statistics.median(browser_ms):.1f} | "
              f"{np.percentile(browser_ms, 90):.1f} | {max(browser_ms):.1f} | {server_ms:.1f} | "
              f"{statistics.median(browser_ms) / GOAL_MS:.2f}")
    print(f"all | {len(every)} | {statistics.median(every):.1f} | "
          f"{np.percentile(every, 90):.1f} | {max(every):.1f} | | "
          f"{statistics.median(every) / GOAL_MS:.2f}")


if __name__ == "__main__":
    main()
