"""The README's "Using it" walkthrough runs as written: its first shell block, with the
brokers' ports 1884 and 1885 replaced by free ones, run by bash in a scratch directory
against the two Mosquitto brokers it starts itself; as written (MQTT 5) and with
`init --protocol 3.1.1`."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.conftest import _free_port, mosquitto_binary
from tests.site import site_uid

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
PORTS = ("1884", "1885")  # edge, cloud, as the README has them


def walkthrough() -> str:
    """The first ```sh block under '## Using it'."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Using it\n"):]
    section = section[: section.find("\n## ", 1)]
    match = re.search(r"^```sh\n(.*?)^```$", section, re.S | re.M)
    assert match, "no ```sh block under '## Using it'"
    return match.group(1)


def test_the_steps_come_in_an_order_that_works() -> None:
    lines = [ln.split("#")[0].strip() for ln in walkthrough().splitlines()]
    commands = [ln for ln in lines if ln]

    def first(pattern: str) -> int:
        hits = [i for i, c in enumerate(commands) if re.search(pattern, c)]
        assert hits, f"no command matching {pattern!r}"
        return hits[0]

    brokers = max(first(rf"^mosquitto -p {p} .*&$") for p in PORTS)
    init = first(r"^iomt-agent init ")
    consumer_once = first(r"^iomt-agent receive .*--timeout")
    daemon = first(r"^iomt-agent run .*&$")
    sample, send = first(r"^iomt-agent sample "), first(r"^iomt-agent send ")
    results = first(r"^iomt-agent receive .*--count")
    assert commands[0].startswith("source .venv/bin/activate")
    assert brokers < init < consumer_once < daemon < send < results and sample < send
    assert "--count" not in commands[consumer_once]  # the first start only subscribes


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_walkthrough_runs_as_written(tmp_path: Path, protocol: str) -> None:
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: run `make mosquitto`")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file() or not (venv / "bin" / "iomt-agent").exists():
        pytest.skip("the tests do not run from a virtual environment with iomt-agent")
    script = walkthrough()
    ports = {p: str(_free_port()) for p in PORTS}
    for old, new in ports.items():
        assert old in script
        script = script.replace(old, new)
    if protocol != "5":
        script = script.replace("--device-id node-1\n",
                                f"--device-id node-1 --protocol {protocol}\n")
        assert f"--protocol {protocol}" in script
    (tmp_path / ".venv").symlink_to(venv)  # the block starts at the top of a clone
    (tmp_path / "walkthrough.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # Output to a file, not a pipe: the brokers it starts in the background would hold a
    # pipe open, so a block that fails early would only be noticed at the timeout.
    output = tmp_path / "walkthrough.out"
    with output.open("w") as sink:
        proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "walkthrough.sh"],
                                cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=240)
        finally:  # the brokers and the agent are its jobs: stop whatever is left of them
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
    out = output.read_text(errors="replace")
    try_dir = tmp_path / "try"
    log = try_dir / "node1" / "agent.log"
    detail = out + "\n--- agent.log:\n" + (log.read_text() if log.exists() else "")
    assert proc.returncode == 0, detail
    assert re.search(r"^8$", out, re.M), detail  # find results -name '*.dcm' | wc -l
    results = sorted((try_dir / "results").rglob("*.dcm"))
    assert len(results) == 8
    pseudonym = site_uid(try_dir / "node1")  # results are de-identified (the default)
    sources = {pseudonym(pydicom.dcmread(p).SOPInstanceUID) for p in (try_dir / "scans").iterdir()}
    for path in results:
        ds = pydicom.dcmread(path)
        assert "SYNTHETIC" in ds.SeriesDescription
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in sources
    assert log.read_text().count('"slice_processed"') == 8
    assert '"agent_stopped"' in log.read_text()
