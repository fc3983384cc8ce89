"""``iomt-agent doctor --config PATH``: is this node ready to serve? A checklist for the
site engineer, one line per check, each ``ok`` or what is wrong and how to fix it:

* the config file is valid (and not writable by others);
* key files: present, readable, private ones not accessible to group/others, of the right kind;
* certificates (CA bundles, client certificates): valid now, not expiring within 30 days,
  client certificate matching its key;
* each broker: name resolves, TCP port open, TLS handshake verifies, MQTT CONNECT accepted
  with the configured credentials (a short-lived session under a separate client id, so the
  running agent's session is not taken over);
* the model bundle: present, every file's sha256 as recorded, loads in the runtime, runs on
  zeros, and passes its golden set (int8 output against the fp32 reference, the bundle's
  PSNR floor) when the bundle carries one;
* free disk for the inbox/outbox stores;
* the security posture (``agent.ops.check_security``): de-identification on with its site
  secret present and 0600 (or a warning that it is off), the receiver's keys by key id,
  and one summary line: each broker link (mutual TLS / TLS / plaintext), de-identification,
  the seal key. Plaintext off loopback and de-identification off are warnings.

Exit status: 0 when nothing failed (warnings allowed), 1 when a check failed, 2 when the
config cannot be read at all.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from agent.ops.check_broker import check_broker
from agent.ops.check_files import check_broker_files, check_config, check_seal_keys
from agent.ops.check_fleet import check_fleet
from agent.ops.check_node import check_disk, check_model
from agent.ops.check_security import check_deid, check_posture, check_receiver_keys
from agent.ops.findings import Finding, who

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2

__all__ = ["Finding", "check_broker", "check_broker_files", "check_config", "check_disk",
           "check_model", "check_seal_keys", "exit_code", "main", "render", "run_checks"]


# -- the whole checklist ------------------------------------------------------------------


def run_checks(config_path: str | Path, *, timeout: float = 5.0,
               now: datetime | None = None) -> tuple[list[Finding], bool]:
    """Run every check. Returns the findings and whether the config could be read."""
    now = now or datetime.now(UTC)
    config, found = check_config(Path(config_path))
    if config is None:
        return found, False
    found += check_seal_keys(config)
    found += check_receiver_keys(config)
    found += check_deid(config)
    for role, cfg in (("edge", config.edge), ("cloud", config.cloud)):
        found += check_broker_files(role, cfg, now)
    for role, cfg in (("edge", config.edge), ("cloud", config.cloud)):
        for url in cfg.urls:  # each node of a cluster (failover_urls)
            node = cfg.model_copy(update={"url": url, "failover_urls": []})
            found += check_broker(role, node, f"{config.client_id(role)}-doctor", timeout)
    found += check_model(config)
    found += check_fleet(config, now)
    found += check_disk(config)
    found += check_posture(config)  # last: the summary of what the lines above found
    return found, True


_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def render(findings: list[Finding], out: TextIO) -> None:
    width = max((len(f.check) for f in findings), default=5)
    for f in findings:
        out.write(f"{_MARK[f.verdict]}  {f.check:<{width}}  {f.subject}: {f.detail}\n")
        if f.fix:
            out.write(f"{'':4}  {'':<{width}}  -> {f.fix}\n")
    counts = {v: sum(1 for f in findings if f.verdict == v) for v in ("ok", "warn", "fail")}
    warn, fail = counts["warn"], counts["fail"]
    out.write(f"\n{counts['ok']} ok, {warn} warning{'' if warn == 1 else 's'}, "
              f"{fail} failure{'' if fail == 1 else 's'}\n")


def main(config_path: str | Path, *, timeout: float = 5.0, out: TextIO | None = None) -> int:
    """``iomt-agent doctor``: print the checklist; 0 = no failure, 1 = failure, 2 = bad config."""
    from agent.log import configure

    out = out or sys.stdout
    # JSON lines: what a runtime prints natively while the guard loads a model becomes
    # events (agent.backends.native_stderr), below this level, so the list stays clean
    configure("error", "json")  # the MQTT probe's own log lines would clutter it too
    out.write(f"iomt-agent doctor: {config_path} (as {who()})\n\n")
    findings, readable = run_checks(config_path, timeout=timeout)
    render(findings, out)
    return exit_code(findings, readable)


def exit_code(findings: list[Finding], config_readable: bool = True) -> int:
    if not config_readable:
        return EXIT_CONFIG
    return EXIT_FAIL if any(f.verdict == "fail" for f in findings) else EXIT_OK
