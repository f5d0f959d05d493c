"""A deterministic mixed stream of device readings, as the bench publishes it."""

from __future__ import annotations

import random
import time

import msgspec


def mixed_stream(n: int, devices: int = 10_000, seed: int = 7) -> list[tuple[str, bytes]]:
    """n messages: 50 % poles, 20 % manholes, 30 % traffic detectors (3 lanes), one reading
    each, unique (device, timestamp), timestamps in the last hour."""
    rng = random.Random(seed)
    start_ms = int(time.time() * 1000) - 3_600_000
    messages = []
    for i in range(n):
        device = i % devices
        district = f"d{device % 12:02d}"
        ts = start_ms + i
        roll = device % 10
        if roll < 5:
            topic = f"cityflux/v1/{district}/pole/pole-{device:06d}"
            body: dict[str, object] = {
                "ts": ts,
                "lamp_on": rng.random() < 0.5,
                "lamp_power_w": round(rng.uniform(0, 150), 1),
                "pm25_ugm3": round(rng.uniform(5, 120), 1),
                "pm10_ugm3": round(rng.uniform(10, 200), 1),
                "noise_dba": round(rng.uniform(40, 80), 1),
                "temperature_c": round(rng.uniform(-5, 35), 1),
                "humidity_pct": round(rng.uniform(20, 95), 1),
            }
        elif roll < 7:
            topic = f"cityflux/v1/{district}/manhole/mh-{device:06d}"
            body = {
                "ts": ts,
                "cover_open": False,
                "tilt_deg": round(rng.uniform(0, 3), 2),
                "water_level_cm": round(rng.uniform(0, 80), 1),
                "ch4_pct_lel": round(rng.uniform(0, 5), 2),
                "h2s_ppm": round(rng.uniform(0, 2), 2),
                "battery_pct": round(rng.uniform(20, 100), 1),
            }
        else:
            topic = f"cityflux/v1/{district}/traffic/det-{device:06d}"
            body = {
                "ts": ts,
                "interval_s": 60,
                "lanes": [
                    {
                        "lane": lane,
                        "count": rng.randint(0, 40),
                        "occupancy_pct": round(rng.uniform(0, 40), 1),
                        "speed_kmh": round(rng.uniform(10, 80), 1),
                    }
                    for lane in (1, 2, 3)
                ],
            }
        messages.append((topic, msgspec.json.encode(body)))
    return messages


def points_in(messages: list[tuple[str, bytes]]) -> int:
    """Line-protocol points the stream becomes (a traffic reading is one point per lane)."""
    return sum(3 if "/traffic/" in topic else 1 for topic, _ in messages)
