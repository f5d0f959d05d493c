"""Known answers from the standards: GB/T 33171 TPI, HCM LOS, HJ 633 IAQI, Leq, GB 3096."""

from __future__ import annotations

import numpy as np
import pytest

from cityflux.analytics import indices


@pytest.mark.parametrize(
    ("dtp", "tpi", "level"),
    [
        (0.0, 0.0, 1), (0.15, 1.0, 1), (0.2999, 1.9993, 1), (0.3, 2.0, 2), (0.4, 3.0, 2),
        (0.4999, 3.999, 2), (0.5, 4.0, 3), (0.55, 5.0, 3), (0.6, 6.0, 4), (0.65, 7.0, 4),
        (0.7, 8.0, 5), (0.85, 9.0, 5), (1.0, 10.0, 5),
    ],
)  # fmt: skip
def test_tpi_at_and_around_every_band_boundary(dtp: float, tpi: float, level: int) -> None:
    got = indices.tpi_from_dtp(np.array([dtp]))
    assert got[0] == pytest.approx(tpi, abs=1e-3)
    assert indices.tpi_level(got)[0] == level


def test_delay_proportion_from_speeds_and_no_data() -> None:
    dtp = indices.delay_proportion(np.array([60.0, 30.0, 12.0, 80.0, np.nan]), np.full(5, 60.0))
    assert dtp[:4] == pytest.approx([0.0, 0.5, 0.8, 0.0])  # faster than free flow: no delay
    assert np.isnan(indices.tpi_from_dtp(dtp)[4])
    assert indices.tpi_level(indices.tpi_from_dtp(dtp))[4] == 0  # no data, never "smooth"


@pytest.mark.parametrize(
    ("speed", "level"),
    [(70, 1), (65, 2), (50.1, 2), (50, 3), (35, 4), (20.1, 4), (20, 5), (5, 5)],
)
def test_expressway_speed_bands(speed: float, level: int) -> None:
    bands = indices.speed_bands(np.array(["expressway"], object))
    got = indices.congestion_level(np.array([float(speed)]), bands)
    assert got[0] == level


@pytest.mark.parametrize(
    ("pct", "los"),
    [(90, "A"), (85.01, "A"), (85, "B"), (67.01, "B"), (67, "C"), (50.01, "C"), (50, "D"),
     (40.01, "D"), (40, "E"), (30.01, "E"), (30, "F"), (10, "F")],
)  # fmt: skip
def test_urban_los_at_every_boundary(pct: float, los: str) -> None:
    got = indices.urban_los(np.array([pct]), np.array([100.0]), np.array([0.5]))
    assert got[0] == los


def test_urban_los_is_f_over_capacity() -> None:
    assert indices.urban_los(np.array([90.0]), np.array([100.0]), np.array([1.05]))[0] == "F"


@pytest.mark.parametrize(
    ("pc_mi_ln", "los"),
    [(5, "A"), (11, "A"), (11.01, "B"), (18, "B"), (26, "C"), (35, "D"), (45, "E"), (45.01, "F")],
)
def test_freeway_los_by_density(pc_mi_ln: float, los: str) -> None:
    per_km = np.array([pc_mi_ln / indices.KM_PER_MILE])
    assert indices.freeway_los(per_km, np.array([0.5]))[0] == los


BREAKPOINTS_2012 = {
    "pm25": [(0, 0), (35, 50), (75, 100), (115, 150), (150, 200), (250, 300), (350, 400),
             (500, 500)],
    "pm10": [(0, 0), (50, 50), (150, 100), (250, 150), (350, 200), (420, 300), (500, 400),
             (600, 500)],
}  # fmt: skip


@pytest.mark.parametrize("pollutant", ["pm25", "pm10"])
def test_iaqi_at_every_breakpoint(pollutant: str) -> None:
    for concentration, expected in BREAKPOINTS_2012[pollutant]:
        got = indices.iaqi(pollutant, np.array([float(concentration)]))
        assert got[0] == expected, (pollutant, concentration)


def test_iaqi_between_breakpoints_rounds_up() -> None:
    # PM2.5 55: 50 + (55-35)/(75-35) x 50 = 75 exactly; 36: 51.25 -> 52 (rounded up)
    got = indices.iaqi("pm25", np.array([55.0, 36.0, 600.0, np.nan]))
    assert got[:3].tolist() == [75.0, 52.0, 500.0]
    assert np.isnan(got[3])
    # PM10 200: 100 + (200-150)/(250-150) x 50 = 125
    assert indices.iaqi("pm10", np.array([200.0]))[0] == 125.0


def test_the_2026_table_moves_the_good_boundary() -> None:
    assert indices.iaqi("pm25", np.array([60.0]), "HJ633-2026")[0] == 100.0
    assert indices.iaqi("pm25", np.array([75.0]), "HJ633-2026")[0] == 114.0  # ceil(113.6)
    assert indices.iaqi("pm10", np.array([150.0]), "HJ633-2026")[0] == 112.0  # ceil(111.5)


def test_aqi_primary_pollutant_and_category() -> None:
    value, primary, category = indices.aqi(
        np.array([30.0, 160.0, 20.0]), np.array([40.0, 200.0, 300.0])
    )
    assert value.tolist() == [43.0, 210.0, 175.0]  # 200 + (160-150)/(250-150) x 100
    assert primary.tolist() == ["", "pm25", "pm10"]  # none named at AQI <= 50
    assert category.tolist() == [1, 5, 4]


def test_leq_of_known_signals() -> None:
    def leq(levels: list[float]) -> float:
        return float(indices.leq(np.array([np.mean(indices.energy(np.array(levels)))]))[0])

    assert leq([65.0] * 10) == pytest.approx(65.0)
    assert leq([60.0, 70.0]) == pytest.approx(67.40, abs=0.01)  # the louder half dominates
    assert leq([50.0, 50.0, 50.0, 80.0]) == pytest.approx(73.99, abs=0.01)
    assert leq([70.0, 0.0]) == pytest.approx(66.99, abs=0.01)  # half the time silent: -3 dB


def test_gb3096_limits_and_periods() -> None:
    zones = np.array(["0", "1", "2", "3", "4a", "4b"], dtype=object)
    assert indices.noise_limit(zones, "day").tolist() == [50, 55, 60, 65, 70, 70]
    assert indices.noise_limit(zones, "night").tolist() == [40, 45, 50, 55, 55, 60]
    assert indices.noise_period(6.0) == "day"
    assert indices.noise_period(21.99) == "day"
    assert indices.noise_period(22.0) == "night"
    assert indices.noise_period(5.99) == "night"


def test_greenshields_consistent_speeds_give_the_expected_indices() -> None:
    # On a 60 km/h arterial, Greenshields' speed at half the jam density is 30 km/h:
    # DTP 0.5 -> TPI 4 (light congestion), 50 % of free flow -> LOS D.
    vf, kj = 60.0, 120.0
    speed = np.array([vf * (1 - 60.0 / kj)])
    assert indices.tpi_from_dtp(indices.delay_proportion(speed, np.array([vf])))[0] == 4.0
    assert indices.urban_los(speed, np.array([vf]), np.array([0.9]))[0] == "D"
