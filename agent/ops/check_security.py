"""``doctor``'s security posture: what protects this node's data, in a few lines.

* ``deid``: de-identification on (and the site secret present, a regular file, 0600) or
  off (a warning: the cloud receives the patient and study modules inside the envelope);
* ``receiver``: where the config carries ``[receiver]``, every recipient private key (0600,
  parses) and every trusted device key, each with its key id, so a rotation in progress
  can be seen;
* ``security``: one summary line: each broker link (mutual TLS, TLS, plaintext on loopback,
  plaintext off loopback), de-identification, the seal suite and key ids. It warns where a
  link is plaintext off loopback or de-identification is off.

Key permissions of the seal keys and broker secrets and certificate expiry are the
``key`` and ``certificate`` lines of ``agent.ops.check_files``.
"""

from __future__ import annotations

from agent.config import BrokerConfig, Config
from agent.crypto import keys
from agent.crypto.site_secret import load_site_secret
from agent.ops.findings import Finding, fail, ok, warn
from agent.transport.broker_url import is_loopback

DEID_OFF_RISK = ("results carry the patient and study modules as the scan has them (inside "
                 "the sealed envelope: the cloud sees names, ids, dates)")


def check_deid(config: Config) -> list[Finding]:
    deid = config.deid
    if not deid.enabled:
        return [warn("deid", "deid.enabled", f"false: {DEID_OFF_RISK}",
                     "set deid.enabled = true unless the cloud is allowed to hold PHI")]
    options = [name for name, on in (("113107 modified dates", deid.retain_modified_dates),
                                     ("113108 patient characteristics",
                                      deid.retain_patient_characteristics),
                                     ("113109 device identity", deid.retain_device_identity))
               if on]
    try:
        load_site_secret(deid.secret_file)
    except keys.KeyFileError as exc:
        return [fail("deid", "deid.secret_file", str(exc),
                     "copy the site's secret (the same on every node of a site) with mode "
                     "0600, or create one with `iomt-agent init` on the site's first node")]
    return [ok("deid", "deid.secret_file", f"{deid.secret_file}: present, 0600; PS3.15 "
               f"basic profile on (options: {', '.join(options) or 'none'})")]


def check_receiver_keys(config: Config) -> list[Finding]:
    receiver = config.receiver
    if receiver is None:
        return []
    found: list[Finding] = []
    for path in receiver.recipient_key_files():
        try:
            key = keys.load_recipient_private_key(path)
            found.append(ok("key", "receiver.recipient_private_key",
                            f"{path}: {key.kind}, key id {key.key_id}"))
        except keys.KeyFileError as exc:
            found.append(fail("key", "receiver.recipient_private_key", str(exc),
                              "fix the file named (chmod 600 for a private key), or drop it "
                              "from the list once nothing sealed to it can arrive"))
    for device, paths in receiver.device_key_files().items():
        for path in paths:
            subject = f"receiver.trusted_devices.{device}"
            try:
                key_id = keys.signing_key_id(keys.load_verify_key(path))
                found.append(ok("key", subject, f"{path}: Ed25519, key id {key_id}"))
            except keys.KeyFileError as exc:
                found.append(fail("key", subject, str(exc),
                                  "use the device's public signing key (SPKI PEM)"))
    return found


def _link(cfg: BrokerConfig) -> tuple[str, bool]:
    """How a broker link is protected, and whether that is acceptable."""
    if cfg.tls:
        return ("mutual TLS" if cfg.cert_file else "TLS, no client certificate"), True
    if is_loopback(cfg.host):
        return "plaintext on loopback", True
    return "PLAINTEXT off loopback", False


def check_posture(config: Config) -> list[Finding]:
    """The one summary line of the node's security posture."""
    risks: list[str] = []
    parts = []
    for role, cfg in (("edge", config.edge), ("cloud", config.cloud)):
        text, safe = _link(cfg)
        parts.append(f"{role} {text}")
        if not safe:
            risks.append(f"{role}.url is plaintext MQTT off loopback")
    parts.append("de-identification " + ("on" if config.deid.enabled else "OFF"))
    if not config.deid.enabled:
        risks.append("de-identification is off")
    try:
        recipient = keys.load_recipient_public_key(config.seal.recipient_public_key)
        parts.append(f"sealed to {recipient.kind} key {recipient.key_id[:16]}")
    except keys.KeyFileError:
        parts.append("seal key unusable (see the key lines)")
    detail = "; ".join(parts)
    if risks:
        return [warn("security", "posture", detail, "; ".join(risks) + ": see the lines "
                     "above for the fix (docs/security.md says what each control stops)")]
    return [ok("security", "posture", detail)]
