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

``cityflux devices nats-accounts`` writes the same accounts for nats-server's MQTT listener
(docs/deploy.md, "A city on NATS"): one user per device, allowed to publish the NATS subjects
of its two topics and to subscribe to nothing, plus the ``cityflux`` service user.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Final

import typer

from cityflux.cli.common import ConfigOption, app, load_or_exit
from cityflux.errors import CityfluxError, ConfigError
from cityflux.ingest.topics import RESERVED_LEVELS
from cityflux.model.citymap import CityMap, load_city_map
from cityflux.model.contract import ID_PATTERN
from cityflux.nats.partition import subject_token

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


# nats-server reads these from its own environment when it loads the accounts file: no role
# password is in the file, and a missing variable stops the server with a message naming it
ROLE_PASSWORD_VARS: Final = {
    "cityflux": "NATS_CITYFLUX_PASSWORD",
    "operator": "NATS_OPERATOR_PASSWORD",
    "simulator": "NATS_SIMULATOR_PASSWORD",
}


def nats_subject(topic: str) -> str:
    """The subject nats-server's MQTT listener publishes a topic as: ``/`` becomes ``.`` and a
    ``.`` inside a level becomes ``//`` (server/mqtt.go, mqttToNATSSubjectConversion)."""
    return ".".join(subject_token(level) for level in topic.split("/"))


def _nats_user(user: str, password: str, permissions: Mapping[str, object]) -> str:
    # nats-server's config language reads JSON, but its strings know only the escapes \" \\
    # \t \n \r \xXX (no \uXXXX): UTF-8 as is, and no control character. A role's password
    # is a $VARIABLE, unquoted.
    if any(ord(c) < 0x20 or c == "\x7f" for c in password):
        raise ConfigError(f"the password of {user!r} has a control character")
    secret = password if password.startswith("$") else json.dumps(password, ensure_ascii=False)
    grants = json.dumps(permissions, separators=(", ", ": "))
    return f"    {{user: {json.dumps(user)}, password: {secret}, permissions: {grants}}}"


def _nats_roles(root: str, stream_root: str, roles: Iterable[str]) -> list[str]:
    """The role users. cityflux: the JetStream API (stream, consumers, pinned fetches, KV and
    object store, acks and flow control), replies on its inboxes, its dead letters, alerts and
    health; it reads everything under the readings' roots, never writes a reading."""
    own = [f"{root}.{level}.>" for level in sorted(RESERVED_LEVELS)]
    jetstream = ["$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "$KV.>", "$O.>"]
    reads = [f"{root}.>", f"{stream_root}.>", "$JS.EVENT.>", "$KV.>", "$O.>"]
    grants: dict[str, dict[str, object]] = {
        "cityflux": {
            "publish": {"allow": [*jetstream, *own, "_INBOX.>"]},
            "subscribe": {"allow": [*reads, "_INBOX.>"]},
        },
        "operator": {
            "publish": {"allow": [f"{root}.alerts.ack"]},
            "subscribe": {"allow": [*own, "_INBOX.>"]},
        },
        # any device's readings and status (the health status has that shape: denied first)
        "simulator": {
            "publish": {"allow": [f"{root}.*.*.*", f"{root}.*.*.*.status"], "deny": own},
            "subscribe": {"deny": [">"]},
        },
    }
    return [_nats_user(r, f"${ROLE_PASSWORD_VARS[r]}", grants[r]) for r in roles]


def nats_accounts(
    city: CityMap,
    topic_root: str,
    stream_root: str,
    passwords: Mapping[str, str],
    roles: Iterable[str] = ("cityflux",),
) -> str:
    """nats-server's ``authorization`` block: the role users, then one user per device of the
    map, which may publish the subjects of its reading and status topics and nothing else, and
    subscribe to nothing. ConfigError for a name that could widen a rule, or a device without
    a password in ``passwords``."""
    root = _root(topic_root)
    users = _nats_roles(nats_subject(root), stream_root, roles)
    for kind, devices in city.devices_by_kind().items():
        for device_id, district in devices:
            _check_names(device_id, district)
            password = passwords.get(device_id)
            if not password:
                raise ConfigError(f"device {device_id!r} has no password")
            subject = nats_subject(f"{root}/{district}/{kind}/{device_id}")
            allow = {"allow": [subject, f"{subject}.status"]}
            grants = {"publish": allow, "subscribe": {"deny": [">"]}}
            users.append(_nats_user(device_id, password, grants))
    head = [
        f"# NATS accounts of city map {city.name!r} (cityflux devices nats-accounts); holds",
        "# the device passwords: keep it 0600. Each device (username = its id) may publish the",
        f"# subjects of {root}/<its district>/<its kind>/<its id> and .../status, nothing else.",
        "# Role passwords come from the server's environment ("
        + ", ".join(f"${ROLE_PASSWORD_VARS[r]}" for r in roles) + ").",
    ]  # fmt: skip
    return "\n".join([*head, "authorization {", "  users = [", *users, "  ]", "}"]) + "\n"


def read_passwords(path: Path, devices: Iterable[str]) -> dict[str, str]:
    """``device_id:password`` lines (deploy/mosquitto/devices/devices.txt); a device of
    ``devices`` that has none gets a generated one, appended to the file (created 0600)."""
    known: dict[str, str] = {}
    if path.exists():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            device, sep, password = line.partition(":")
            if not sep or not password:
                raise ConfigError(f"{path}:{number}: expected device_id:password")
            if device in ROLE_ACCOUNTS:
                raise ConfigError(f"{path}:{number}: {device} is a role, not a device")
            # nats-server takes a password starting with $2 for a bcrypt hash
            if password.startswith("$2"):
                raise ConfigError(f"{path}:{number}: a password must not start with $2")
            known[device] = password
    new = {d: secrets.token_urlsafe(24) for d in dict.fromkeys(devices) if d not in known}
    if new:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.writelines(f"{device}:{password}\n" for device, password in new.items())
    return known | new


def _write_secret(path: Path, text: str) -> None:
    """Atomically and readable by its owner only: it holds passwords."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an old .tmp may have had wider rights
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


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


@devices_app.command("nats-accounts")
def nats_accounts_command(
    city_map: Annotated[Path, typer.Argument(help="the city map JSON (cityflux city generate)")],
    output: Annotated[
        Path, typer.Option("--output", "--out", "-o", help="the accounts file to write (0600)")
    ],
    passwords: Annotated[
        Path,
        typer.Option(
            help="device_id:password lines; devices without one get a generated password, "
            "appended to this file"
        ),
    ],
    role: Annotated[
        list[str] | None,
        typer.Option(help="role users besides cityflux: operator, simulator (demo only)"),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """nats-server's accounts for the city map's devices (include it from nats.conf)."""
    loaded = load_or_exit(config)
    try:
        roles = list(dict.fromkeys(["cityflux", *(role or [])]))
        unknown = set(roles) - ROLE_ACCOUNTS
        if unknown:
            raise ConfigError(f"--role must be operator or simulator, not {sorted(unknown)}")
        city = load_city_map(city_map)
        ids = [d for devices in city.devices_by_kind().values() for d, _ in devices]
        known = read_passwords(passwords, ids)
        text = nats_accounts(city, loaded.mqtt.topic_root, loaded.nats.subject_root, known, roles)
        _write_secret(output, text)
    except (CityfluxError, OSError) as exc:
        typer.echo(f"devices nats-accounts: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"devices nats-accounts: wrote {output} for {len(ids)} devices", err=True)
