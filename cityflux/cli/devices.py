"""``cityflux devices acl``: the broker's device accounts, generated from the city map.

Each device gets a mosquitto ACL section of its own: it may publish its readings and its
status under its own id, its own kind and its own district, and nothing else. A ``pattern``
line cannot say this (``cityflux/v1/+/pole/%u`` lets the ``+`` be ``alerts`` or any invented
district), so the district comes from the map. make-auth.sh appends this file to the roles
in deploy/mosquitto/acl (docs/deploy.md).

mosquitto 2.0 reads an ACL file in quadratic time in its ``user`` sections (measured: 10,000
devices 1.8 s, 25,000 devices 23 s, 100,000 devices 357 s, at every start and every SIGHUP
reload, during which the broker serves nobody). Above PER_DEVICE_LIMIT devices the file holds
one ``pattern`` per district and kind instead: a device still publishes only under its own
id and only in a district of the map, but could use another district of the map than its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Final

import typer

from cityflux.cli.common import ConfigOption, app, load_or_exit
from cityflux.errors import CityfluxError, ConfigError
from cityflux.ingest.topics import RESERVED_LEVELS
from cityflux.model.citymap import CityMap, load_city_map
from cityflux.model.contract import ID_PATTERN

devices_app = typer.Typer(no_args_is_help=True, help="Device accounts on the broker.")
app.add_typer(devices_app, name="devices")

# The role accounts of deploy/mosquitto/acl: a device with one of these ids would add its
# topics to that role's section (mosquitto merges sections of the same user).
ROLE_ACCOUNTS: Final = frozenset({"cityflux", "operator", "simulator"})
# Most devices for one section each (mode "auto"); see the module's docstring.
PER_DEVICE_LIMIT: Final = 10_000


def _root(topic_root: str) -> str:
    root = topic_root.rstrip("/")
    if not root or any(c in root for c in "+#% \n\r") or root.startswith("$"):
        raise ConfigError(f"topic root {topic_root!r} must be a plain topic prefix")
    return root


def device_acl(city: CityMap, topic_root: str) -> str:
    """One ``user`` section per device: write ``{root}/{district}/{kind}/{id}`` and its
    ``/status``. ConfigError for an id or district that could widen a rule or break the file."""
    root = _root(topic_root)
    topics: dict[str, list[str]] = {}
    for kind, devices in city.devices_by_kind().items():
        for device_id, district in devices:
            _check_names(device_id, district)
            topic = f"{root}/{district}/{kind}/{device_id}"
            topics.setdefault(device_id, []).extend((topic, f"{topic}/status"))
    lines = [
        f"# device accounts of city map {city.name!r} (cityflux devices acl): each may publish",
        f"# {root}/<its district>/<its kind>/<its id> and .../status, nothing else",
    ]
    for device_id, allowed in topics.items():
        lines += ["", f"user {device_id}", *(f"topic write {t}" for t in allowed)]
    return "\n".join(lines) + "\n"


def district_acl(city: CityMap, topic_root: str) -> str:
    """``pattern`` lines per district and kind of the map: ``{root}/{district}/{kind}/%u``
    and its ``/status``; for cities too large for one section per device."""
    root = _root(topic_root)
    pairs: set[tuple[str, str]] = set()
    for kind, devices in city.devices_by_kind().items():
        for device_id, district in devices:
            _check_names(device_id, district)
            pairs.add((district, kind))
    lines = [
        f"# device accounts of city map {city.name!r} (cityflux devices acl --mode district):",
        "# each device (username = its id) may publish only under its own id, in a district",
        "# and kind of the map",
    ]
    for district, kind in sorted(pairs):
        topic = f"{root}/{district}/{kind}/%u"
        lines += [f"pattern write {topic}", f"pattern write {topic}/status"]
    return "\n".join(lines) + "\n"


def _check_names(device_id: str, district: str) -> None:
    # ID_PATTERN has no wildcard, separator, space or newline: nothing that widens a topic
    for what, name in (("device id", device_id), ("district", district)):
        if not ID_PATTERN.fullmatch(name):
            raise ConfigError(f"{what} {name!r} must match {ID_PATTERN.pattern}")
    if device_id in ROLE_ACCOUNTS:
        raise ConfigError(f"device id {device_id!r} is a role account's name")
    if district in RESERVED_LEVELS:
        raise ConfigError(f"district {district!r} is one of cityflux's own topic levels")


def _write(path: Path, text: str) -> None:
    """Atomically: the broker may reload it (SIGHUP) at any moment."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@devices_app.command("acl")
def acl(
    city_map: Annotated[Path, typer.Argument(help="the city map JSON (cityflux city generate)")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="file to write (default: stdout)")
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="device: a section per device (bound to its district); district: patterns per "
            f"district; auto: device up to {PER_DEVICE_LIMIT:,} devices"
        ),
    ] = "auto",
    config: ConfigOption = None,
) -> None:
    """The mosquitto ACL of every device in the city map (for make-auth.sh)."""
    root = load_or_exit(config).mqtt.topic_root
    try:
        if mode not in {"auto", "device", "district"}:
            raise ConfigError(f"--mode must be auto, device or district, not {mode!r}")
        city = load_city_map(city_map)
        count = sum(len(d) for d in city.devices_by_kind().values())
        if mode == "auto":
            mode = "device" if count <= PER_DEVICE_LIMIT else "district"
        text = device_acl(city, root) if mode == "device" else district_acl(city, root)
        if output is None:
            sys.stdout.write(text)
            return
        _write(output, text)
    except (CityfluxError, OSError) as exc:
        typer.echo(f"devices acl: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"devices acl: wrote {output} for {count} devices (mode {mode})", err=True)
