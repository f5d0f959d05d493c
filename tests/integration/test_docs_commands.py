"""Every shell block marked runnable in README.md and docs/*.md, run exactly as printed, in
document order, in a fresh shell (``env -i``: a plain PATH, HOME in a temporary directory, the
documented PATH step, and the documented CITYFLUX_* variables naming servers the fixtures
started). The convention is in docs/architecture.md ("Runnable documentation")."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cityflux.servers import LocalInfluxDB, LocalMosquitto
from tests.support import ROOT

MARKER = re.compile(
    r"^<!--\s*runnable(?::\s*(?P<options>[^>]*?))?\s*-->\n```(?:sh|bash)\n(?P<code>.*?)^```",
    re.M | re.S,
)
DEFAULT_TIMEOUT_S = 120
# an `interrupt` block with `ready=TEXT`: Ctrl-C this long after it printed every ready text
SETTLE_S = 2.0
PLAIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# the checkout as a new user has it, but the files the commands write go to a scratch copy
LINKED = ("Makefile", "pyproject.toml", "scripts", "cityflux", "examples", "docs", "tests",
          "bench", "README.md", ".venv")  # fmt: skip
COPIED = ("deploy",)  # `dashboards generate` writes here


@dataclass(slots=True)
class Block:
    doc: str
    line: int
    code: str
    options: dict[str, str] = field(default_factory=dict)
    ready: list[str] = field(default_factory=list)  # texts an `interrupt` block prints when up

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def runnable_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for match in MARKER.finditer(text):
        options, ready = {}, []
        for word in shlex.split(match["options"] or ""):  # ready="cityflux is up": one word
            key, _, value = word.partition("=")
            if key == "ready":
                ready.append(value)
            else:
                options[key] = value
        line = text.count("\n", 0, match.start("code")) + 1
        where = path.relative_to(ROOT).as_posix()
        blocks.append(Block(where, line, match["code"], options, ready))
    return blocks


def test_the_marker_is_found_and_every_readme_command_block_is_marked() -> None:
    """The extraction itself: the README's quick start, PATH step and command blocks are
    found, and no ```sh block of the Commands section is left unmarked by accident."""
    blocks = runnable_blocks(ROOT / "README.md")
    assert blocks[0].code.strip() == "make demo"
    assert [b.code.strip() for b in blocks if "setup" in b.options] == ["source .venv/bin/activate"]
    readme = (ROOT / "README.md").read_text()
    commands = readme[readme.index("## Commands") :]
    fences = commands.count("```sh")
    unmarked_allowed = commands.count("not run by the test")
    assert fences - unmarked_allowed == len(runnable_blocks_in(commands))


def runnable_blocks_in(text: str) -> list[re.Match[str]]:
    return list(MARKER.finditer(text))


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A checkout whose files are the repository's and whose var/ and deploy/ are its own."""
    # the shared virtualenv must be installed from the repository, not from the scratch copy
    subprocess.run([ROOT / "scripts" / "bootstrap.sh", "--python-only"], check=True,
                   cwd=ROOT, timeout=600, capture_output=True)  # fmt: skip
    work = tmp_path / "checkout"
    work.mkdir()
    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    for name in COPIED:
        shutil.copytree(ROOT / name, work / name, symlinks=True)
    return work


def fresh_env(home: Path, broker: LocalMosquitto, influxdb: LocalInfluxDB) -> dict[str, str]:
    return {
        "PATH": PLAIN_PATH,
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "COLUMNS": "80",
        "CITYFLUX_MQTT__URL": broker.url,
        "CITYFLUX_INFLUX__URL": influxdb.url,
        "CITYFLUX_INFLUX__DATABASE": "docs_commands",
        # `make demo` as printed, as fast as the machine goes: the same city, figures and
        # alerts in ~7 s instead of ~150 s (~18 s at 600x; the suite stays under ten
        # minutes); the README names the variable. The paced demo: tests/integration/test_demo.py
        "CITYFLUX_DEMO_SPEED": "max",
    }


def script(block: Block, setup: list[Block]) -> str:
    steps = [] if "bare" in block.options else [b.code for b in setup]
    return "\n".join([*steps, block.code])


def run_block(block: Block, setup: list[Block], cwd: Path, env: dict[str, str], log: Path) -> str:
    """Run one block; returns what went wrong ("" if nothing)."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", script(block, setup)],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            if "interrupt" in block.options:
                problem = _interrupt(process, float(block.options["interrupt"]), block.ready, log)
            else:
                timeout = float(block.options.get("timeout") or DEFAULT_TIMEOUT_S)
                code = process.wait(timeout)
                problem = f"exit status {code}" if code else ""
        except subprocess.TimeoutExpired:
            problem = "timed out"
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return problem


@pytest.fixture(autouse=True)
def terminal_signals() -> Iterator[None]:
    """Ctrl-C acts as in a terminal even when the suite runs with SIGINT ignored (as a
    background job of a non-interactive shell does): an ignored SIGINT is inherited through
    exec, and Python then installs no KeyboardInterrupt handler in the command. A handler of
    our own is not inherited (exec resets it to the default), so set one while the test runs."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _interrupt(
    process: subprocess.Popen[bytes], after_s: float, ready: list[str], log: Path
) -> str:
    """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group; after
    ``after_s``, or, with ready texts, once the command printed each of them (within
    ``after_s``) and ran SETTLE_S longer: a readiness check instead of a fixed wait."""
    deadline = time.monotonic() + after_s
    ready_at: float | None = None
    while ready_at is None or time.monotonic() < ready_at + SETTLE_S:
        if process.poll() is not None:
            return f"ended by itself (status {process.returncode}) before Ctrl-C"
        if ready and ready_at is None and _printed_all(log, ready):
            ready_at = time.monotonic()
        if ready_at is None and time.monotonic() >= deadline:
            if ready:
                return f"did not print {ready!r} within {after_s:.0f} s"
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    code = process.wait(120)
    return f"exit status {code} after Ctrl-C" if code else ""


def _printed_all(log: Path, texts: list[str]) -> bool:
    """Each text in the output so far, whatever the terminal width wrapped (rich's log lines
    continue on indented lines)."""
    output = " ".join(log.read_text(errors="replace").split())
    return all(text in output for text in texts)


@pytest.mark.timeout(1800)  # the quick start alone is `make demo` (about 3 minutes)
def test_every_runnable_block_runs_as_printed(
    scratch: Path, broker: LocalMosquitto, influxdb: LocalInfluxDB, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = fresh_env(home, broker, influxdb)
    blocks = [block for doc in documents() for block in runnable_blocks(doc)]
    setup = [b for b in blocks if "setup" in b.options]
    failures = []
    logs = tmp_path / "logs"
    logs.mkdir()
    for number, block in enumerate(b for b in blocks if "setup" not in b.options):
        log = logs / f"{number:02d}-{block.doc.replace('/', '_')}-{block.line}.log"
        began = time.monotonic()
        problem = run_block(block, setup, scratch, env, log)
        output = log.read_text(errors="replace")
        print(f"{block.where}: {problem or 'ok'} in {time.monotonic() - began:.0f} s")
        if not problem and "Traceback (most recent call last)" in output:
            problem = "printed a traceback"
        if not problem and "is for another city map" in output:  # `up --data-dir var/demo`
            problem = "did not continue the data directory's city"
        if problem:
            failures.append(f"{block.where}: {problem}\n{block.code}\n--- output (tail):\n"
                            + "\n".join(output.splitlines()[-25:]))  # fmt: skip
        if block.code.strip() == "make demo" and not problem:
            check_demo(output, scratch)
    assert not failures, "\n\n".join(failures)


def check_demo(output: str, checkout: Path) -> None:
    """The quick start: the demo wrote its data where its closing hint says."""
    assert (checkout / "var" / "demo" / "analytics" / "alerts.sqlite").is_file()
    assert (checkout / "var" / "demo" / "city-map.json").is_file()
    assert "var/demo" in output
    # the closing line states published = landed + rejected, with numbers that add up
    line = re.search(r"published ([\d,]+) = landed ([\d,]+) \+ rejected ([\d,]+)", output)
    assert line is not None, output[-2000:]
    published, landed, rejected = (int(n.replace(",", "")) for n in line.groups())
    assert published == landed + rejected and published > 10_000
