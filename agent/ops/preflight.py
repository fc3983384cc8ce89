"""``iomt-agent config check``: what ``run`` would refuse, found without starting it.

Without ``--guard`` nothing runs a model: the checks are the config file (already parsed
by the caller), every key file the config names (present, of the right kind, private ones
not accessible to group/others: what ``run`` refuses before it loads the model), the
de-identification secret where de-identification is on (a warning where it is off), the
broker files (CA, client certificate and key, password: a key or password file that group
or others may read is refused, as ``run`` refuses it), the bundle (``bundle.json`` and
the sha256 of every file) and the runtime (``model.backend`` installed, with a file in the
bundle). The int8 accuracy guard needs the model to run, so it is left out unless asked
for: ``--guard`` loads the model as ``run`` does (``agent.model.serving.load_model``, ``auto``'s
choice included, with a throw-away state directory so nothing is cached) and reports the
guard's verdict. The network is not touched: ``iomt-agent doctor`` checks the brokers.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import BrokerConfig, Config
from agent.crypto import keys
from agent.crypto.site_secret import load_site_secret
from agent.transport.tls import TLSFilesError, client_context

GUARD_NOT_RUN = ("the int8 accuracy guard was not run (it runs the model): add --guard to "
                 "run it as `run` would")


@dataclass
class Findings:
    """``problems`` make ``run`` refuse to start (exit 2); ``warnings`` do not; ``notes``
    say what was checked."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _key(out: Findings, where: str, path: Path, load: Callable[[Path], object]) -> None:
    try:
        load(path)
    except keys.KeyFileError as exc:
        out.problems.append(f"{where}: {exc}")


def check_keys(config: Config, out: Findings) -> None:
    """Every key file ``run`` (and ``receive``, where ``[receiver]`` is set) loads."""
    _key(out, "seal.recipient_public_key", config.seal.recipient_public_key,
         keys.load_recipient_public_key)
    _key(out, "seal.device_signing_key", config.seal.device_signing_key, keys.load_signing_key)
    if config.deid.enabled:
        _key(out, "deid.secret_file", config.deid.secret_file, load_site_secret)
    else:
        out.warnings.append("deid.enabled = false: results carry the patient and study "
                            "modules as the scan has them (sealed, but the cloud sees them)")
    if config.receiver is not None:
        for path in config.receiver.recipient_key_files():
            _key(out, "receiver.recipient_private_key", path, keys.load_recipient_private_key)
        for device, paths in config.receiver.device_key_files().items():
            for path in paths:
                _key(out, f"receiver.trusted_devices.{device}", path, keys.load_verify_key)


def _readable(path: Path) -> str | None:
    try:
        with path.open("rb"):
            return None
    except FileNotFoundError:
        return f"file {path} not found"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"


def check_broker_files(role: str, cfg: BrokerConfig, out: Findings) -> None:
    before = len(out.problems)
    for name in ("ca_file", "cert_file", "key_file", "password_file"):
        path: Path | None = getattr(cfg, name)
        if path is None:
            continue
        problem = _readable(path)
        if problem is not None:
            out.problems.append(f"{role}.{name}: {problem}")
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if name in ("key_file", "password_file") and os.name == "posix" and mode & 0o077:
            out.problems.append(f"{role}.{name}: {path} is accessible by group/others "
                                f"(mode {mode:04o}): run 'chmod 600 {path}'")
    if cfg.tls and len(out.problems) == before:
        try:
            client_context(cfg, role)  # the files hold what they should, and match
        except TLSFilesError as exc:
            out.problems.append(str(exc))


def check_fleet_root(config: Config, out: Findings) -> None:
    """``fleet.root``: a TUF root that its own keys sign (python-tuf)."""
    if config.fleet is None:
        return
    from agent.fleet.trusted_root import root_problem, root_summary

    if (problem := root_problem(config.fleet.root)) is not None:
        out.problems.append(f"fleet.root: {problem}, or remove [fleet]")
    else:
        out.notes.append(root_summary(config.fleet.root))


def check_model_files(config: Config, out: Findings) -> None:
    """The bundle (every sha256) and the runtime, without loading the model."""
    from agent.backends import INSTALL_HINTS, RUNTIMES, runtime_installed
    from agent.model.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(config.model.bundle)
    except BundleError as exc:
        out.problems.append(f"model.bundle: {exc}")
        return
    backend = config.model.backend
    if backend == "auto":
        usable = [rt for rt in RUNTIMES if rt in bundle.backends and runtime_installed(rt)]
        if not usable:
            out.problems.append(f"model.backend: \"auto\", but no installed runtime has a "
                                f"file in bundle {bundle.name} (it has: "
                                f"{', '.join(sorted(bundle.backends))})")
            return
        runtimes = ", ".join(usable)
    else:
        if backend not in bundle.backends:
            out.problems.append(f"model.backend: bundle {bundle.name} has no file for "
                                f"{backend!r} (it has: {', '.join(sorted(bundle.backends))}); "
                                'choose one of those or "auto"')
            return
        if not runtime_installed(backend):
            out.problems.append(f"model.backend: {backend} is not installed "
                                f"({INSTALL_HINTS[backend]})")
            return
        runtimes = backend
    out.notes.append(f"bundle {bundle.name} {bundle.version}: every file matches its sha256; "
                     f"runtime {runtimes} installed")


def check_guard(config: Config, out: Findings) -> None:
    """Load the model as ``run`` does and report the guard's verdict."""
    from agent.backends import BackendError
    from agent.model.bundle import BundleError
    from agent.model.guard import GuardFailed
    from agent.model.serving import load_model

    with tempfile.TemporaryDirectory(prefix="iomt-config-check-") as state:
        try:
            served = load_model(config.model, Path(state))
        except GuardFailed as exc:
            out.problems.append(f"model: refused by the accuracy guard: {exc.report.reason}")
            return
        except (BundleError, BackendError) as exc:
            out.problems.append(f"model: {exc}")
            return
        try:
            out.notes.append(f"guard: {served.runtime} {served.precision}: "
                             f"{served.guard.reason}")
        finally:
            served.close()


def check(config: Config, *, guard: bool = False) -> Findings:
    """Every check ``config check`` makes; the guard only with ``guard``."""
    out = Findings()
    check_keys(config, out)
    for role, cfg in (("edge", config.edge), ("cloud", config.cloud)):
        check_broker_files(role, cfg, out)
    from agent.daemon.state_dir import state_dir_problem

    assert config.agent.state_dir is not None
    if (problem := state_dir_problem(config.agent.state_dir)) is not None:
        out.problems.append(problem)
    check_fleet_root(config, out)
    check_model_files(config, out)
    if guard and not out.problems:
        check_guard(config, out)
    elif not guard:
        out.notes.append(GUARD_NOT_RUN)
    return out
