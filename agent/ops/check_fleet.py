"""The doctor's check of ``[fleet]``: the trusted root a node verifies updates against, and
what the fleet has activated on this node, and whether the clock can be trusted for
expiry (``agent.fleet.clock``). Nothing when the section is absent."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

from agent.config import Config
from agent.ops.findings import EXPIRY_WARNING, Finding, fail, ok, warn


def check_fleet(config: Config, now: datetime | None = None) -> list[Finding]:
    if config.fleet is None:
        return []
    from tuf.api.metadata import Metadata, Root

    from agent.fleet.activation import BundleStore
    from agent.fleet.clock import clock_behind

    now = now or datetime.now(UTC)
    subject = "fleet.root"
    path = config.fleet.root
    fix = ("install the fleet's root.json (written by `iomt-agent fleet init-repo`) at "
           "fleet.root")
    try:
        md = Metadata[Root].from_bytes(path.read_bytes())
        md.verify_delegate("root", md)
    except OSError as exc:
        return [fail("fleet", subject, f"cannot read {path}: {exc.strerror}", fix)]
    except Exception as exc:  # python-tuf raises several kinds for a bad file
        return [fail("fleet", subject, f"{path} is not a TUF root signed by its own "
                     f"threshold: {exc}", fix)]
    root = md.signed
    detail = (f"TUF root version {root.version} for group {config.fleet.group}: root "
              f"threshold {root.roles['root'].threshold} of {len(root.roles['root'].keyids)} "
              f"key(s), expires {root.expires:%Y-%m-%d}")
    assert config.agent.state_dir is not None
    store = BundleStore(config.agent.state_dir)
    trusted = store.metadata / "root.json"
    if trusted.exists():
        with contextlib.suppress(Exception):  # a damaged cache is rebuilt from fleet.root
            detail += (f"; the node already trusts version "
                       f"{Metadata[Root].from_bytes(trusted.read_bytes()).signed.version}")
    found = []
    if root.expires <= now and not trusted.exists():
        found.append(fail("fleet", subject, f"{detail}: expired", "install a current root"))
    elif root.expires - now < EXPIRY_WARNING and not trusted.exists():
        found.append(warn("fleet", subject, f"{detail}: expires soon",
                          "rotate the root (a new root signed by the old keys)"))
    else:
        found.append(ok("fleet", subject, detail))
    behind = clock_behind(store.metadata, now)
    if behind is not None:
        found.append(warn("fleet", "fleet clock", behind, "set the clock: NTP "
                          "(systemd-timesyncd) or an RTC; the model serving keeps serving"))
    if store.current is not None:
        found.append(ok("fleet", "fleet bundle", f"serving the fleet's bundle {store.current} "
                        "(it overrides model.bundle)"))
    return found
