"""The v2 write path (/api/v2/write, org + bucket + token) for real, against VictoriaMetrics."""

from __future__ import annotations

import time

from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalMosquitto, LocalVictoriaMetrics
from tests.support import export, publish_all, running, v2_overrides, wait_for

NOW_MS = int(time.time() * 1000) - 60_000


def test_pipeline_writes_through_the_v2_api(
    broker: LocalMosquitto, config: Config, victoria: LocalVictoriaMetrics
) -> None:
    config = config.with_overrides(v2_overrides(victoria))
    device = f"pole-v2-{NOW_MS}"
    payloads = [
        (
            f"cityflux/v1/centre/pole/{device}",
            f'{{"ts": {NOW_MS + i}, "pm25_ugm3": {i}.25, "lamp_on": true}}'.encode(),
        )
        for i in range(100)
    ]
    with running(Pipeline(config)) as pipeline:
        publish_all(broker.port, payloads)
        wait_for(lambda: pipeline.metrics.value("lines_written_total") >= 100, what="writes")
        assert pipeline.metrics.value("lines_spooled_total") == 0
    series = wait_for(
        lambda: export(victoria, f'{{__name__="pole_pm25_ugm3",device_id="{device}"}}'),
        what="exported series",
    )
    assert len(series) == 1
    assert series[0]["metric"]["district"] == "centre"
    assert series[0]["values"] == [i + 0.25 for i in range(100)]
    assert series[0]["timestamps"] == [NOW_MS + i for i in range(100)]  # VM keeps ms
