"""``doctor``'s checks of the node itself: the model bundle (digests, runtime, the guard) and
free disk for the stores."""

from __future__ import annotations

import os
import shutil
import stat
import time
from typing import TYPE_CHECKING

from agent.config import Config
from agent.model.guard_cause import format_db
from agent.ops.findings import (
    MIN_FREE_BYTES,
    Finding,
    describe_mode,
    fail,
    ok,
    size_text,
    warn,
    who,
)

if TYPE_CHECKING:
    from agent.backends import ModelRunner
    from agent.model.bundle import ModelBundle
    from agent.model.guard import GuardReport


# -- model -------------------------------------------------------------------------------


def check_model(config: Config) -> list[Finding]:
    import numpy as np

    from agent.backends import BackendError, open_runner, runner_options
    from agent.model.bundle import BundleError, load_bundle

    subject = "model.bundle"
    backend = config.model.backend
    try:
        bundle = load_bundle(config.model.bundle)
        served = None if backend == "auto" else bundle.backend_file(backend)
    except BundleError as exc:
        return [fail("model", subject, str(exc), "install a bundle: systemd/install.sh "
                      "--bundle DIR, or fix model.bundle")]
    found = [ok("model", subject, f"{bundle.name} {bundle.version} at {bundle.root}: "
                 "every file matches its sha256")]
    started = time.perf_counter()
    guard: GuardReport | None = None
    try:
        if served is None:  # auto: what the agent would serve, chosen afresh (no cache)
            chosen = _choose(bundle, config, found)
            if chosen is None:
                return found
            runner, guard = chosen
        else:
            runner = open_runner(backend, str(served.path), runner_options(config.model, bundle))
    except BackendError as exc:
        return [*found, fail("model", backend, str(exc),
                              "reinstall the runtime, or use a bundle built for it")]
    try:
        channels = bundle.input_channels
        zeros = np.zeros((1, channels, *bundle.input.shape), dtype=np.float32)
        out = runner.run(zeros)
        ms = (time.perf_counter() - started) * 1000
        if not np.all(np.isfinite(out)):
            found.append(fail("model", backend, "output on zeros is not finite",
                               "the model file is broken: rebuild the bundle"))
        else:
            found.append(ok("model", backend, f"runs: {list(zeros.shape)} -> "
                             f"{list(out.shape)} (load and first run {ms:.0f} ms)"))
        if bundle.golden is not None:
            if guard is None:
                from agent.model.guard import run_guard

                guard = run_guard(bundle, runner)
            found.append(_golden(guard))
    except Exception as exc:  # a runtime's own errors are untyped
        found.append(fail("model", backend, f"inference failed: {exc}",
                           "check that the bundle's contract matches the model file"))
    finally:
        runner.close()
    return found


def _choose(bundle: ModelBundle, config: Config,
            found: list[Finding]) -> tuple[ModelRunner, GuardReport] | None:
    """``backend = "auto"``: open what the agent would serve and add a finding with the
    choice and its reason; None (a failed golden-set finding added) when nothing passes
    the guard. Raises ``BackendError`` when no runtime can open the model."""
    from agent.backends import runner_options
    from agent.model.guard import GuardFailed
    from agent.model.select import choose_runner
    from agent.model.serving import worker_plan

    try:
        runner, choice = choose_runner(
            bundle, runner_options(config.model, bundle), None,
            plan=worker_plan(config.model.workers, config.model.intra_op_threads))
    except GuardFailed as exc:
        found.append(_golden(exc.report))
        return None
    found.append(ok("model", "backend auto", f"would serve {choice.runtime} "
                     f"{choice.precision}: {choice.reason}"))
    return runner, choice.guard


def _golden(report: GuardReport) -> Finding:
    """The bundle's activation guard (``agent.model.guard``), the same check ``run`` makes."""
    text = (f"{len(report.inputs)} golden slices: worst PSNR {format_db(report.worst_psnr_db)} "
            f"dB vs fp32 (floor {format_db(report.min_psnr_db)} dB)")
    if not report.ok:  # what failed and why; the fix on its own line
        why = "; ".join(t for t in (report.shortfall or report.reason, report.explanation) if t)
        return fail("model", "golden set", f"{text}: {why}", report.fix or "rebuild the bundle")
    return ok("model", "golden set", text)


# -- disk --------------------------------------------------------------------------------


def check_disk(config: Config) -> list[Finding]:
    state = config.agent.state_dir
    assert state is not None
    found: list[Finding] = []
    existing = state
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if state.exists():
        mode = stat.S_IMODE(state.stat().st_mode)
        if mode & 0o077:
            found.append(warn("disk", "agent.state_dir", f"{state}: mode {mode:04o}",
                               f"the inbox holds scans (PHI): chmod 700 {state}"))
        else:
            found.append(ok("disk", "agent.state_dir", f"{state}: {describe_mode(state)}"))
        if not os.access(state, os.W_OK):
            found.append(warn("disk", "agent.state_dir", f"{state} not writable by {who()}",
                               "fine if the service user owns it (the unit's StateDirectory=)"
                               "; otherwise chown it to the service user"))
    else:
        found.append(ok("disk", "agent.state_dir", f"{state} does not exist yet: systemd "
                         "(StateDirectory=) or the agent creates it at start"))
    usage = shutil.disk_usage(existing)
    used = sum(p.stat().st_size for p in state.glob("agent.db*")) if state.exists() else 0
    caps = config.limits.inbox_max_bytes + config.limits.outbox_max_bytes
    room = usage.free + used
    where = f"{size_text(usage.free)} free on the file system of {existing}"
    if usage.free < MIN_FREE_BYTES:
        found.append(fail("disk", "free space", where, f"free at least "
                           f"{size_text(MIN_FREE_BYTES)}, or move agent.state_dir"))
    elif room < caps:
        found.append(warn("disk", "free space", f"{where}; inbox + outbox may grow to "
                           f"{size_text(caps)}", "lower limits.inbox_max_bytes and "
                           "limits.outbox_max_bytes to fit, or free space"))
    else:
        found.append(ok("disk", "free space", f"{where}; inbox + outbox capped at "
                         f"{size_text(caps)}"))
    return found
