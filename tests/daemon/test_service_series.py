"""The daemon's 2.5D path (agent.service + agent.stacking) on a real inbox/outbox, a real
ONNX model and real DICOM, driven in-process without brokers: slices in any order, twice,
one missing, and an agent restart halfway."""

from __future__ import annotations

import hashlib
import io
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from agent.config import load_config
from agent.crypto import keys, seal
from agent.crypto.site_secret import load_site_secret
from agent.daemon.service import Agent
from agent.demo.sample_series import build_series
from agent.dicom.deid import Deidentifier
from agent.ops.scaffold import InitOptions, write_directory
from tests.bundles import expected_context_output, make_context_bundle

WEIGHTS = [0.5, 0.25, 1.0, 0.125, 0.0625]  # slots -2 .. +2: asymmetric, order matters
N = 10
TOPIC = "iomt/site-1/scans/gw"


@pytest.fixture
def node(tmp_path: Path) -> Path:
    bundle = make_context_bundle(tmp_path / "bundle", WEIGHTS)
    config = write_directory(InitOptions(
        directory=tmp_path / "node", edge_url="mqtt://127.0.0.1:1", cloud_url="mqtt://127.0.0.1:1",
        site="site-1", device_id="edge-1", bundle=bundle))
    text = config.read_text()
    config.write_text(text + "\n[series]\nidle_timeout_s = 0.5\nmax_open = 4\n")
    return config


def series(n: int = N) -> tuple[list[bytes], list[float]]:
    values = [100.0 * (i + 1) for i in range(n)]
    vol = np.stack([np.full((32, 32), v, dtype=np.uint16) for v in values])
    return build_series(vol, spacing_mm=(1.0, 1.0, 1.0), first_slice_z_mm=-5.0), values


class Driver:
    """One Agent, its model and finisher threads running, fed by hand instead of by a
    broker."""

    def __init__(self, config: Path) -> None:
        self.agent = Agent(load_config(config), config)
        self.agent.prepare()
        self.agent.stages.start()

    def accept(self, payloads: list[bytes]) -> None:
        for p in payloads:
            self.agent.store.accept(TOPIC, hashlib.sha256(p).hexdigest(), p)

    def one_pass(self) -> None:
        """One turn of the processing loop, committed."""
        self.agent.stages.process_pending()
        self.agent.stages.drain()

    def run_until(self, done: int, timeout: float = 20.0) -> None:
        """Process until ``done`` outbox rows exist (or idle timeouts have passed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.agent.stages.process_pending()
            if self.agent.store.depths()[1] >= done and self.agent.stages.idle:
                break
            time.sleep(0.05)
        self.agent.stages.drain()

    def stop(self) -> list[bytes]:
        self.agent.stages.stop(timeout=10)
        rows = [r.payload for r in self.agent.store.outbox(limit=1000) if r.kind == "result"]
        self.agent.model.close()
        self.agent.store.close()
        self.agent.state_lock.release()  # as the process's end would
        return rows


class Opener:
    """Verifies and decrypts results as the cloud does; ``source_uid`` is what the site
    (which holds the de-identification secret) computes to map a result back to its scan."""

    def __init__(self, node: Path) -> None:
        kdir = node.parent / "keys"
        self.recipient = keys.load_recipient_private_key(kdir / "cloud-recipient.key")
        self.device = keys.load_verify_key(kdir / "device-signing.pub")
        self.site = Deidentifier(load_site_secret(kdir / "site-deid.key"))

    def __call__(self, envelope: bytes) -> pydicom.Dataset:
        opened = seal.open_envelope(envelope, recipients={self.recipient.key_id: self.recipient},
                                    trusted_devices={"edge-1": self.device})
        return pydicom.dcmread(io.BytesIO(opened.plaintext))

    def source_uid(self, payload: bytes) -> str:
        return self.site.uid(pydicom.dcmread(io.BytesIO(payload)).SOPInstanceUID)


@pytest.fixture
def opener(node: Path) -> Iterator[Opener]:
    yield Opener(node)


def check(results: list[bytes], open_result, payloads: list[bytes], values: list[float],  # type: ignore[no-untyped-def]
          slots_for) -> dict[int, int]:  # type: ignore[no-untyped-def]
    index = {open_result.source_uid(p): i for i, p in enumerate(payloads)}
    got: dict[int, int] = {}
    for envelope in results:
        ds = open_result(envelope)
        i = index[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        want = expected_context_output(values, WEIGHTS, slots_for(i)) * 1000.0
        pixel = float(ds.pixel_array[16, 16])
        assert abs(pixel - want) <= 1.0, (i, slots_for(i), pixel, want)
        got[i] = got.get(i, 0) + 1
    return got


def clamp_slots(i: int, present: set[int], n: int = N) -> list[int]:
    """Neighbours as the agent pads them: a missing slot repeats the one towards the
    centre; positions beyond the series' ends likewise."""
    slots = {0: i}
    for side in (-1, 1):
        for d in (1, 2):
            j = i + side * d
            slots[side * d] = j if 0 <= j < n and j in present else slots[side * (d - 1)]
    return [slots[d] for d in (-2, -1, 0, 1, 2)]


def test_shuffled_duplicated_series_with_a_missing_slice(node: Path, opener) -> None:  # type: ignore[no-untyped-def]
    payloads, values = series()
    missing = 6
    order = [i for i in range(N) if i != missing] + [0, 4, 9]  # three redelivered
    random.Random(3).shuffle(order)
    d = Driver(node)
    d.accept([payloads[i] for i in order])
    d.run_until(N - 1)
    agent = d.agent
    assert agent.stages.series is not None and agent.stages.series.counts == (0, 0)
    assert agent.store.held_count() == 0  # the series closed: payloads released
    counts = agent.store.counters()
    assert counts.get("duplicates") == 3 and counts.get("processed") == N - 1
    results = d.stop()
    present = set(range(N)) - {missing}
    got = check(results, opener, payloads, values, lambda i: clamp_slots(i, present))
    assert got == dict.fromkeys(present, 1)


def test_pending_slices_survive_a_restart(node: Path, opener) -> None:  # type: ignore[no-untyped-def]
    payloads, values = series()
    order = list(range(N))
    random.Random(11).shuffle(order)
    first, rest = order[: N // 2], order[N // 2 :]
    d = Driver(node)
    d.accept([payloads[i] for i in first])
    d.one_pass()  # well short of the idle timeout: most wait for neighbours
    held = d.agent.store.held_count()
    pending = d.agent.store.depths()[0]
    before = d.stop()
    assert held + pending == len(first)  # nothing lost, nothing released early

    d = Driver(node)  # a new process on the same state dir
    assert d.agent.stages.series is not None
    d.accept([payloads[i] for i in rest])
    d.run_until(N)
    after = d.stop()
    got = check(before + after, opener, payloads, values, lambda i: clamp_slots(i, set(range(N))))
    assert got == dict.fromkeys(range(N), 1)


def test_series_limits_are_reported(node: Path, opener) -> None:  # type: ignore[no-untyped-def]
    text = node.read_text().replace("max_open = 4", "max_open = 4\nmax_slices = 3")
    node.write_text(text)
    payloads, _values = series(5)
    d = Driver(node)
    d.accept(payloads)
    d.run_until(5)
    reasons = [r.payload for r in d.agent.store.outbox(limit=100) if r.kind == "error"]
    assert len(reasons) == 2
    assert all(b'"reason":"series_too_large"' in r for r in reasons)
    assert b"series.max_slices is 3" in reasons[0]
    d.stop()


def test_a_series_at_another_slice_spacing_is_served_with_a_warning(node: Path) -> None:
    import structlog

    values = [100.0 * (i + 1) for i in range(5)]
    vol = np.stack([np.full((32, 32), v, dtype=np.uint16) for v in values])
    payloads = build_series(vol, spacing_mm=(3.0, 1.0, 1.0))  # the model wants 1 mm
    d = Driver(node)
    with structlog.testing.capture_logs() as logs:
        d.accept(payloads)
        d.run_until(5)
    warned = [e for e in logs if e["event"] == "slice_spacing_differs"]
    assert len(warned) == 1 and warned[0]["spacing_mm"] == 3.0
    assert d.agent.store.counters().get("processed") == 5
    d.stop()


def results_by_model(d: Driver, open_result, payloads: list[bytes]) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    """Source slice indices of the result rows in the outbox, by the model that made them."""
    index = {open_result.source_uid(p): i for i, p in enumerate(payloads)}
    out: dict[str, list[int]] = {}
    for row in d.agent.store.outbox(limit=1000):
        if row.kind == "result":
            ds = open_result(row.payload)
            desc = str(ds.DerivationDescription)
            model = next(m for m in ("test-context", "test-scale") if m in desc)
            out.setdefault(model, []).append(index[ds.SourceImageSequence[0]
                                                   .ReferencedSOPInstanceUID])
    return out


def test_reload_from_a_2_5d_to_a_2d_model_mid_series(node: Path, opener) -> None:  # type: ignore[no-untyped-def]
    from tests.bundles import make_scale_bundle

    payloads, _values = series()
    d = Driver(node)
    d.accept(payloads[:5])
    d.one_pass()  # slice 2 has its neighbours; 0, 1, 3, 4 wait
    assert d.agent.store.held_count() == 1 and d.agent.store.depths()[0] == 4
    flat = make_scale_bundle(node.parent.parent / "flat", factor=0.5)
    node.write_text(node.read_text().replace(f'bundle = "{node.parent.parent / "bundle"}"',
                                             f'bundle = "{flat}"'))
    d.agent.reload_now()
    assert d.agent.model.bundle.name == "test-scale" and d.agent.stages.series is None
    assert d.agent.store.held_count() == 0  # nobody's neighbours any more
    d.accept(payloads[5:])
    d.run_until(N)
    by_model = results_by_model(d, opener, payloads)
    # Slice 2 went through the 2.5D model before the swap; every waiting slice through the
    # new one: each slice once, none lost.
    assert sorted(by_model["test-context"]) == [2]
    assert sorted(by_model["test-scale"]) == [i for i in range(N) if i != 2]
    d.stop()


def test_a_config_that_no_longer_parses_is_refused_and_named(node: Path) -> None:
    d = Driver(node)
    good = node.read_text()
    node.write_text(good.replace("[model]", "[model]\nbakend = 1"))
    d.agent.reload_now()
    refused = d.agent.model_refused
    assert refused is not None and refused["config"] == str(node) and "bundle" not in refused
    assert "model.bakend: unknown key" in refused["reason"]
    (report,) = [r.payload for r in d.agent.store.outbox(limit=10) if r.kind == "error"]
    assert b'"reason":"model_refused"' in report and b"still serving test-context" in report
    assert d.agent.model.bundle.name == "test-context"
    d.stop()


def test_a_held_twin_is_released_when_a_restart_reloads_it(node: Path, opener) -> None:  # type: ignore[no-untyped-def]
    payloads, values = series()
    d = Driver(node)
    d.accept(payloads[:5])
    d.one_pass()
    # A redelivered copy of the processed slice 2, committed as held (a crash between the
    # two copies' commits leaves this behind).
    store = d.agent.store
    twin = store.accept(TOPIC, hashlib.sha256(payloads[2]).hexdigest(), payloads[2])
    store.complete(twin, [], "duplicates", hold=True)
    assert store.held_count() == 2
    d.stop()
    d = Driver(node)  # the restart: held rows reloaded, the twin released
    assert d.agent.store.held_count() == 1
    d.accept(payloads[5:])
    d.run_until(N)
    assert d.agent.store.held_count() == 0
    got = check([r.payload for r in d.agent.store.outbox(limit=1000) if r.kind == "result"],
                opener, payloads, values, lambda i: clamp_slots(i, set(range(N))))
    assert got == dict.fromkeys(range(N), 1)  # the twin was not processed again
    d.stop()


def _renumbered(payload: bytes, number: int) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(payload))
    ds.InstanceNumber = number
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_neighbours_follow_the_geometry_where_instance_numbers_disagree(  # type: ignore[no-untyped-def]
        node: Path, opener) -> None:
    """InstanceNumber is only a label: here it runs against the slice positions (and is
    scrambled), and each slice still gets its geometric neighbours."""
    payloads, values = series()
    numbers = list(range(1, N + 1))
    random.Random(5).shuffle(numbers)
    payloads = [_renumbered(p, numbers[i]) for i, p in enumerate(payloads)]
    d = Driver(node)
    d.accept(payloads)
    d.run_until(N)
    results = d.stop()
    got = check(results, opener, payloads, values, lambda i: clamp_slots(i, set(range(N))))
    assert got == dict.fromkeys(range(N), 1)
