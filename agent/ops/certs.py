"""``iomt-agent certs init``: a development PKI in one command.

A CA, one server certificate per broker (SANs: localhost, 127.0.0.1, ::1 and each
``--hostname``), and one client certificate per identity, whose CN is the MQTT user name the
brokers see (``use_identity_as_username``): each device, the site's scanner gateway, the
site's cloud consumer and the fleet operator. Private keys are written 0600. The brokers'
Mosquitto configs and ACLs are written by ``agent.ops.mosquitto_conf``; ``pki.json`` records
what was made so that ``iomt-agent init --certs DIR`` can use it.

Keys are ECDSA P-256: every TLS 1.2 stack, OpenSSL's Mosquitto and the secure elements that
hold device keys in hardware (ATECC608, TPM 2.0) speak it.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import AgentError
from agent.transport.topics import TopicError, check_level

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MANIFEST = "pki.json"
DEFAULT_EDGE_PORT, DEFAULT_CLOUD_PORT = 8883, 8884
CA_DAYS, LEAF_DAYS = 3650, 397  # 397: the longest leaf lifetime browsers accept


class PkiError(AgentError):
    """The PKI cannot be created or used as asked (a bad flag, a missing pki.json)."""


class PkiExists(PkiError):
    """The directory holds a PKI already."""


@dataclass(frozen=True)
class Identity:
    """One client of the brokers. ``cn`` is its certificate's CN and its MQTT user name.

    Device ids are topic levels (no ``@``), so the ``role@scope`` names of the other
    identities can never collide with a device's.
    """

    role: str  # device | gateway | cloud | operator
    cn: str
    name: str  # file stem under clients/

    @property
    def cert(self) -> str:
        return f"clients/{self.name}.pem"

    @property
    def key(self) -> str:
        return f"clients/{self.name}.key"


def identities(site: str, devices: list[str]) -> list[Identity]:
    """Every client identity of one site: its devices, gateway, cloud consumer, operator."""
    return [
        *(Identity("device", d, f"device-{d}") for d in devices),
        Identity("gateway", f"scanner-gateway@{site}", "gateway"),
        Identity("cloud", f"cloud-consumer@{site}", "cloud-consumer"),
        Identity("operator", "fleet-operator@iomt", "fleet-operator"),
    ]


@dataclass(frozen=True)
class PkiOptions:
    directory: Path
    site: str
    device_ids: list[str]
    hostnames: list[str] = field(default_factory=list)
    edge_port: int = DEFAULT_EDGE_PORT
    cloud_port: int = DEFAULT_CLOUD_PORT
    fleet_group: str = "default"
    force: bool = False

    def check(self) -> None:
        """Raise ``PkiError`` naming the flag that is wrong."""
        try:
            check_level(self.site, "--site")
            check_level(self.fleet_group, "--fleet-group")
            for device in self.device_ids:
                check_level(device, "--device-id")
        except TopicError as exc:
            raise PkiError(str(exc)) from None
        if not self.device_ids:
            raise PkiError("give at least one --device-id")
        if len(set(self.device_ids)) != len(self.device_ids):
            raise PkiError("--device-id: each device once")
        for flag, port in (("--edge-port", self.edge_port), ("--cloud-port", self.cloud_port)):
            if not 1 <= port <= 65535:
                raise PkiError(f"{flag} {port}: use a port from 1 to 65535")
        if self.edge_port == self.cloud_port:
            raise PkiError("--edge-port and --cloud-port must differ (two brokers)")
        for name in self.hostnames:
            if not name or "/" in name or " " in name:
                raise PkiError(f"--hostname {name!r}: give a DNS name or an IP address")


# -- certificates -----------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iomt-edge-agent dev PKI"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def new_ca(cn: str = "iomt dev CA", *, now: datetime | None = None,
           days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    now = now or datetime.now(UTC)
    key = new_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, *,
          server_names: list[str] | None = None, not_before: datetime | None = None,
          not_after: datetime | None = None) -> tuple[ec.EllipticCurvePrivateKey,
                                                      x509.Certificate]:
    """A leaf certificate signed by the CA: a TLS server certificate with ``server_names``
    as its SANs, else a TLS client certificate whose CN is the identity."""
    start = not_before or datetime.now(UTC) - timedelta(minutes=5)
    end = not_after or start + timedelta(days=LEAF_DAYS)
    key = new_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    if server_names:
        builder = builder.add_extension(_san(server_names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """PKCS#8 PEM, unencrypted (the broker and the agent read it unattended), mode 0600 from
    the moment the file exists."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA of a PKI directory (for issuing more certificates, e.g. in tests)."""
    key = serialization.load_pem_private_key((directory / "ca" / "ca.key").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{directory / 'ca' / 'ca.key'}: not an ECDSA key")
    cert = x509.load_pem_x509_certificate((directory / "ca" / "ca.pem").read_bytes())
    return key, cert


# -- the directory -----------------------------------------------------------------------


def create_pki(opts: PkiOptions) -> dict[str, object]:
    """Write the PKI, the brokers' configs and ``pki.json``; returns the manifest."""
    from agent.ops.mosquitto_conf import write_broker_configs

    opts.check()
    root = opts.directory.resolve()
    if (root / MANIFEST).exists() and not opts.force:
        raise PkiExists(f"{root / MANIFEST} exists: this directory holds a PKI already "
                       "(pass --force to replace it, which invalidates every certificate)")
    for sub in ("ca", "brokers", "clients"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "ca").chmod(0o700)
    ca_key, ca_cert = new_ca(f"iomt dev CA ({opts.site})")
    write_key(root / "ca" / "ca.key", ca_key)
    write_cert(root / "ca" / "ca.pem", ca_cert)
    server_names = list(dict.fromkeys([*LOOPBACK_NAMES, *opts.hostnames]))
    for broker in ("edge", "cloud"):
        key, cert = issue(ca_key, ca_cert, f"{broker}-broker", server_names=server_names)
        write_key(root / "brokers" / f"{broker}.key", key)
        write_cert(root / "brokers" / f"{broker}.pem", cert)
    people = identities(opts.site, opts.device_ids)
    for ident in people:
        key, cert = issue(ca_key, ca_cert, ident.cn)
        write_key(root / ident.key, key)
        write_cert(root / ident.cert, cert)
    manifest: dict[str, object] = {
        "v": 1,
        "site": opts.site,
        "devices": opts.device_ids,
        "fleet_group": opts.fleet_group,
        "hostnames": server_names,
        "ports": {"edge": opts.edge_port, "cloud": opts.cloud_port},
        "ca": "ca/ca.pem",
        "identities": [{"role": i.role, "cn": i.cn, "cert": i.cert, "key": i.key}
                       for i in people],
    }
    write_broker_configs(root, opts, people)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(directory: Path) -> dict[str, object]:
    """``pki.json`` of a PKI directory, or ``PkiError`` saying how to make one."""
    path = directory / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PkiError(f"--certs {directory}: no {MANIFEST} in it (create the PKI with "
                       f"`iomt-agent certs init {directory} --site S --device-id D`)") from None
    except (OSError, ValueError) as exc:
        raise PkiError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict) or data.get("v") != 1:
        raise PkiError(f"{path}: not a pki.json this version writes (v 1)")
    return data
