"""`cityflux scenario run --report`: the report opens in headless Chromium, its screenshot
shows the plots, and its figures are the data in InfluxDB."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import matplotlib.image
import msgspec
import numpy as np

from cityflux.config import Config
from cityflux.servers import LocalInfluxDB, LocalMosquitto
from cityflux.store.influx import InfluxWriter
from tests.support import ROOT


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "headless Chromium is missing: apt-get install chromium (make test does it)"
    return found


def test_report_shows_its_plots_and_matches_influxdb(
    tmp_path: Path, broker: LocalMosquitto, influxdb: LocalInfluxDB
) -> None:
    database = f"report_{uuid.uuid4().hex[:8]}"
    report = tmp_path / "report.html"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYFLUX_")}
    env |= {"CITYFLUX_INFLUX__DATABASE": database}
    result = subprocess.run(
        [sys.executable, "-m", "cityflux", "scenario", "run", "rush-hour-incident",
         "--report", str(report), "--mqtt-url", broker.url, "--influx-url", influxdb.url,
         "--data-dir", str(tmp_path / "runs")],
        cwd=ROOT, env=env, capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    assert "detection scores" in output

    page = report.read_text()
    figures = msgspec.json.decode(
        re.search(r'<script type="application/json" id="figures">(.*?)</script>', page, re.S)
        .group(1)  # type: ignore[union-attr]
        .replace("<\\/", "</")
    )
    db = InfluxWriter(
        Config().with_overrides({"influx.url": influxdb.url, "influx.database": database}).influx
    )
    try:
        tpi = db.query(
            'SELECT "tpi" FROM "traffic_district" WHERE "window" = \'1m\' AND "district" = '
            f"'city' AND time >= {figures['start_ms']}ms"
        )["results"][0]["series"][0]["values"]
        traffic = db.query('SELECT count("occupancy_pct") FROM "traffic"')["results"][0]
    finally:
        db.query(f'DROP DATABASE "{database}"', method="POST")
        db.close()
    assert figures["district_tpi"]["city"] == [[t / 1e6, v] for t, v in tpi]
    assert figures["points"]["traffic"] == traffic["series"][0]["values"][0][1]
    incident = next(s for s in figures["scores"] if s["event_type"] == "incident")
    assert incident["recall"] == 1.0
    assert f"<td>{html.escape('incident')}</td>" in page

    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1100,1500", f"--screenshot={shot}", report.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    pixels = matplotlib.image.imread(str(shot))[:, :, :3]
    assert pixels.shape[0] >= 1400
    colourful = (pixels.max(axis=2) - pixels.min(axis=2)) > 0.25  # not white, grey or black
    # the TPI lines, the red incident span and the alert bars: thousands of coloured pixels
    assert colourful.sum() > 5_000
    rows_with_colour = np.flatnonzero(colourful.sum(axis=1) > 5)
    assert rows_with_colour.max() - rows_with_colour.min() > 450  # both plots, top to bottom
