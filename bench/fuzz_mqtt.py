"""A long fuzz run of the MQTT packet reader, and its reassembly figures (docs/performance.md).

    python -m bench.fuzz_mqtt --seconds 300            # coverage-guided (atheris), else hypothesis
    python -m bench.fuzz_mqtt --engine hypothesis --seconds 60
    python -m bench.fuzz_mqtt --reassembly             # a 10 MiB PUBLISH in 16 KiB pieces

The property is the one tests/unit/test_mqtt_fuzz.py checks briefly: whatever the bytes,
``PacketReader.feed`` and the control-packet parsers return or raise ``MqttProtocolError``, and
a stream parses the same whole or split. atheris (libFuzzer) mutates towards new branches of
``cityflux/mqtt/codec.py`` from a seed corpus of valid packets; a finding is written to
``--artifacts`` as ``crash-*`` and the run exits non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

CODEC, CONTROL = "cityflux.mqtt.codec", "cityflux.mqtt.control"
OVERSIZE = "cityflux.mqtt.oversize"


def seed_packets(codec: Any) -> list[bytes]:
    """Valid packets of both versions: where the mutations start."""
    seeds = []
    for version in (codec.V311, codec.V5):
        flag = bytes([version & 1])  # the first byte of an input picks the version
        seeds += [
            flag + codec.publish_packet("cityflux/v1/d1/pole/p-1", b'{"ts":1}', 7, version),
            flag + codec.publish_packet("a", b"x" * 300, 0, version, retain=True),
            flag + b"\xd0\x00" + codec.publish_packet("b/c", b"", 65_535, version),
            flag + b"\x20\x02\x00\x00" + b"\x20\x03\x01\x00\x00",
            flag + b"\x90\x04\x00\x01\x00\x01" + b"\x40\x03\x00\x01\x10",
            flag + b"\x20\x0e\x00\x00\x0b\x13\x00\x0a\x21\x00\x14\x27\x00\x00\x10\x00",
            flag + b"\xe0\x06\x8b\x04\x1f\x00\x01x",
        ]
    return seeds


def check_one(codec: ModuleType, control: ModuleType, data: bytes) -> None:
    """The property: only parses or MqttProtocolError; the same result however it is split."""
    from cityflux.errors import MqttProtocolError

    if len(data) < 2:
        return
    version = codec.V5 if data[0] & 1 else codec.V311
    cut_seed, stream = data[1], data[2:]
    whole = _feed(codec, version, [stream])
    step = max(1, cut_seed)
    pieces = [stream[i : i + step] for i in range(0, len(stream), step)]
    split = _feed(codec, version, pieces)
    if whole[0] == "error" or split[0] == "error":  # the same error; what came before it in
        whole, split = whole[:2], split[:2]  # the failing read is dropped with the connection
    if whole != split:
        raise AssertionError(f"split by {step} parses differently: {whole!r} != {split!r}")
    for kind, parse in (
        (codec.CONNACK, control.parse_connack),
        (codec.SUBACK, control.suback_codes),
        (codec.DISCONNECT, control.disconnect_reason),
        (codec.PUBACK, control.puback_reason),
    ):
        with contextlib.suppress(MqttProtocolError):
            parse(codec.Control(kind, stream[:64]), version)


def _feed(codec: Any, version: int, pieces: list[bytes]) -> tuple[Any, ...]:
    from cityflux.errors import MqttProtocolError

    # below the fuzzer's 4 KiB inputs, so that oversized read-through is reached and completes
    reader = codec.PacketReader(version, max_packet_size=512)
    topics, ids, payloads, controls = [], [], [], []
    try:
        for piece in pieces:
            parsed = reader.feed(piece)
            topics += parsed.topics
            ids += parsed.packet_ids
            # an oversized payload holds its prefix but has its true length: compare both
            payloads += [(bytes(p), len(p)) for p in parsed.payloads]
            controls += [(c.type, c.body) for c in parsed.controls]
    except MqttProtocolError as exc:
        return ("error", str(exc), topics, ids, payloads, controls)
    return ("ok", topics, ids, payloads, controls)


# -- atheris ---------------------------------------------------------------------------------


def atheris_child(seconds: int, corpus: Path, artifacts: Path) -> None:
    """Runs in a child process: libFuzzer ends the process itself when the time is up."""
    import atheris

    with atheris.instrument_imports(include=[CODEC, CONTROL, OVERSIZE]):
        from cityflux.mqtt import codec, control

    def one_input(data: bytes) -> None:
        check_one(codec, control, data)

    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={seconds}",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
            "-max_len=4096",
            str(corpus),
        ],
        one_input,
    )
    atheris.Fuzz()


def run_atheris(seconds: int, artifacts: Path) -> int:
    from cityflux.mqtt import codec

    corpus = Path(tempfile.mkdtemp(prefix="mqtt-corpus-"))
    for number, seed in enumerate(seed_packets(codec)):
        (corpus / f"seed-{number}").write_bytes(seed)
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bench.fuzz_mqtt", "--child", "--seconds", str(seconds)]
    command += ["--corpus", str(corpus), "--artifacts", str(artifacts)]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    stats = dict(re.findall(r"stat::(\w+):\s*(\d+)", done.stderr))
    coverage = re.findall(r"cov: (\d+) ft: (\d+)", done.stderr)
    findings = sorted(p.name for p in artifacts.glob("crash-*"))
    execs = int(stats.get("number_of_executed_units", 0))
    print(
        f"engine: atheris (libFuzzer), {elapsed:.0f} s, {execs:,} execs ({execs / elapsed:,.0f}/s)"
    )
    if coverage:
        print(f"coverage: {coverage[-1][0]} edges, {coverage[-1][1]} features")
    print(
        f"corpus: {len(list(corpus.iterdir()))} inputs; new units: {stats.get('new_units_added')}"
    )
    print(f"findings: {len(findings)} {findings or ''}")
    if done.returncode and not findings:
        print(done.stderr[-3_000:], file=sys.stderr)
    return 1 if findings or done.returncode else 0


# -- hypothesis ------------------------------------------------------------------------------


def run_hypothesis(seconds: int) -> int:
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    from cityflux.mqtt import codec, control

    execs = 0
    seeds = seed_packets(codec)

    @settings(
        max_examples=500,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        base=st.sampled_from(seeds),
        edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
        tail=st.binary(max_size=200),
    )
    def property_(base: bytes, edits: list[tuple[int, int]], tail: bytes) -> None:
        nonlocal execs
        execs += 1
        data = bytearray(base + tail)
        for at, value in edits:
            if at < len(data):
                data[at] = value
        check_one(codec, control, bytes(data))

    started, run = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        seed(run)(property_)()
        run += 1
    elapsed = time.monotonic() - started
    print(f"engine: hypothesis, {elapsed:.0f} s, {execs:,} execs ({execs / elapsed:,.0f}/s)")
    print("findings: 0")  # a finding raises out of property_ with its minimal example
    return 0


# -- reassembly ------------------------------------------------------------------------------


def reassembly() -> None:
    """A 10 MiB PUBLISH read in 16 KiB pieces, and 200,000 small ones read 256 KiB at a time."""
    from cityflux.mqtt import codec

    payload = b"x" * (10 * 1024 * 1024)
    packet = codec.publish_packet("a/b", payload, 7, codec.V311)
    pieces = [packet[i : i + 16_384] for i in range(0, len(packet), 16_384)]
    best, copied = float("inf"), 0
    for _ in range(5):
        reader = codec.PacketReader(codec.V311, max_packet_size=len(packet))
        started = time.perf_counter()
        for piece in pieces:
            parsed = reader.feed(piece)
        best = min(best, time.perf_counter() - started)
        assert parsed.payloads == [payload]
        copied = reader.buffered_bytes
    print(
        f"10 MiB PUBLISH in {len(pieces)} pieces of 16 KiB: {best * 1000:.1f} ms, "
        f"{copied / 2**20:.1f} MiB into the reassembly buffer"
    )
    for version in (codec.V311, codec.V5):
        body = b'{"ts":1700000000000,"pm25_ugm3":12.5,"noise_dba":55}' * 3
        stream = b"".join(
            codec.publish_packet(
                f"cityflux/v1/d{i % 50}/pole/p-{i % 999}", body, i % 65_535 + 1, version
            )
            for i in range(200_000)
        )
        chunks = [stream[i : i + 262_144] for i in range(0, len(stream), 262_144)]
        best = float("inf")
        for _ in range(5):
            reader = codec.PacketReader(version)
            started = time.perf_counter()
            count = sum(len(reader.feed(chunk).topics) for chunk in chunks)
            best = min(best, time.perf_counter() - started)
        assert count == 200_000
        name = "5" if version == codec.V5 else "3.1.1"
        print(f"MQTT {name}: 200,000 PUBLISHes of {len(body)} B: {count / best:,.0f} msg/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    parser.add_argument("--artifacts", type=Path, default=Path("var/fuzz-mqtt"))
    parser.add_argument("--reassembly", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reassembly:
        reassembly()
        return 0
    if args.child:
        atheris_child(args.seconds, args.corpus, args.artifacts)
        return 0
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") else "hypothesis"
    if engine == "atheris":
        return run_atheris(args.seconds, args.artifacts)
    return run_hypothesis(args.seconds)


if __name__ == "__main__":
    sys.exit(main())
