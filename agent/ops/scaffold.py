"""``iomt-agent init``: a ready-to-run directory with a config and development keys."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from agent.config import ConfigError, parse_config
from agent.crypto import keys
from agent.crypto.site_secret import create_site_secret
from agent.model.bundle import BundleError, load_bundle

BUNDLE_NAME = "t1w-to-t2w-lite"


def default_bundle() -> Path | None:
    """The reference bundle of a source checkout or editable install, if there is one."""
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = base / "models" / BUNDLE_NAME
        if (candidate / "bundle.json").is_file():
            return candidate
    return None


def check_bundle(bundle: Path) -> None:
    """Refuse a ``--bundle`` that is not a model bundle, or one whose files do not match
    their digests (``BundleError``, naming the flag): ``run`` would refuse it."""
    if bundle.is_file():
        raise BundleError(f"--bundle {bundle}: a file: give the bundle's directory (the one "
                          "that holds bundle.json, e.g. models/t1w-to-t2w-lite)")
    if not bundle.is_dir():
        raise BundleError(f"--bundle {bundle}: no such directory (give a model bundle "
                          "directory, e.g. models/t1w-to-t2w-lite)")
    try:
        load_bundle(bundle)
    except BundleError as exc:
        raise BundleError(f"--bundle {bundle}: {exc}") from None


@dataclass(frozen=True)
class InitOptions:
    """``edge_url``/``cloud_url`` may be empty with ``certs``: then ``mqtts://localhost`` on
    the PKI's ports. With ``certs``, an empty ``site``/``device_id`` is taken from the PKI."""

    directory: Path
    edge_url: str
    cloud_url: str
    site: str = "site-1"
    device_id: str = "edge-1"
    certs: Path | None = None
    bundle: Path | None = None
    protocol: str = "5"
    recipient_kind: keys.RecipientKind = keys.DEFAULT_RECIPIENT_KIND
    force: bool = False
    fleet_group: str | None = None  # with fleet_root: a [fleet] section (model updates)
    fleet_root: Path | None = None
    allow_plaintext: bool = False  # mqtt:// to a host that is not loopback


def plaintext_lines(opts: InitOptions) -> dict[str, str]:
    """The ``allow_plaintext`` line of each broker section whose URL needs it; a
    ``ConfigError`` naming the flags when ``--allow-plaintext`` was not given."""
    from urllib.parse import urlsplit

    from agent.transport.broker_url import is_loopback

    lines, problems = {}, []
    for role in ("edge", "cloud"):
        url = getattr(opts, f"{role}_url")
        parts = urlsplit(url)
        if parts.scheme != "mqtt" or is_loopback(parts.hostname or ""):
            lines[role] = ""
        elif opts.allow_plaintext:
            lines[role] = "allow_plaintext = true           # no TLS: traffic is unencrypted\n"
        else:
            problems.append(f"--{role}-url {url}: plaintext MQTT to a host that is not "
                            "loopback: use mqtts:// with --certs PKI_DIR (`iomt-agent certs "
                            "init` makes a development PKI), or pass --allow-plaintext")
    if problems:
        raise ConfigError("init flags", problems)
    return lines


FLEET_TEMPLATE = """
[fleet]           # signed model updates from the cloud broker (TUF); remove to take none
group = "{group}"
root = "fleet/root.json"         # the fleet's trusted root (from `iomt-agent fleet init-repo`)
"""

TEMPLATE = """\
# iomt-edge-agent configuration (written by `iomt-agent init`).
# Relative paths are relative to this file. Reference: README.md, section Configuration.

[agent]
site = "{site}"
device_id = "{device_id}"
state_dir = "state"

[edge]            # where scanner gateways publish DICOM scans
url = "{edge_url}"
protocol = "{protocol}"
{edge_tls}
[cloud]           # where sealed results go
url = "{cloud_url}"
protocol = "{protocol}"
{cloud_tls}
[model]
bundle = "{bundle}"
backend = "auto"                 # the fastest runtime x precision that passes the guard
workers = 0                      # slices inferred at once (0: 2 for a slow model, 2+ cores)
intra_op_threads = 0             # threads per worker (0: the cores shared out)
inter_op_threads = 1

[seal]
recipient_public_key = "keys/cloud-recipient.pub"
device_signing_key = "keys/device-signing.key"

[limits]
max_payload_bytes = 67108864     # 64 MiB
pixel_budget = 16777216          # rows x columns x frames
inbox_max_bytes = 2147483648
outbox_max_bytes = 2147483648

[storage]         # when the outbox or the disk is full (docs/reliability.md)
outbox_full = "backpressure"     # or "drop_oldest": drop the oldest results, report each
min_free_disk_bytes = 67108864   # 64 MiB kept free on the state directory's filesystem

[decode]          # each scan is decoded in a child process under these budgets
memory_bytes = 1073741824        # 1 GiB beyond its start-up footprint
timeout_s = 10.0

[deid]            # PS3.15 Annex E de-identification before sealing (README, Configuration)
enabled = true
secret_file = "keys/site-deid.key"   # the same file on every node of the site (0600)
retain_modified_dates = false         # 113107: shift dates per patient instead of removing
retain_patient_characteristics = false  # 113108: keep sex, age, size, weight
retain_device_identity = false        # 113109: keep station name, device serial numbers

[domain]          # an input outside the model's training domain (README, Domain shift)
policy = "serve"                      # serve: marked result; refuse: error report domain_shift
series_min_slices = 3

[log]
level = "info"
format = "auto"

# The cloud side, for `iomt-agent receive` (a development convenience: in production the
# recipient private key lives only in the cloud, never on the edge node).
[receiver]
recipient_private_key = "keys/cloud-recipient.key"
trusted_devices = {{ "{device_id}" = "keys/device-signing.pub" }}
# client_id = "iomt-{site}-cloud-receiver"  # its persistent session: one receiver per id
{receiver_note}"""


def with_pki(opts: InitOptions) -> tuple[InitOptions, str]:
    """``opts`` completed from the PKI of ``opts.certs`` (site, device, URLs), and the TLS
    lines of a broker section (the device's certificate); ``PkiError`` names what does not
    match."""
    from agent.ops.certs import PkiError, read_manifest

    assert opts.certs is not None
    root = opts.certs.resolve()
    pki = read_manifest(root)
    site = opts.site or str(pki["site"])
    devices = [str(d) for d in pki["devices"]]  # type: ignore[attr-defined]
    device = opts.device_id or devices[0]
    if site != pki["site"]:
        raise PkiError(f"--site {site}: the PKI in {root} is for site {pki['site']}")
    if device not in devices:
        raise PkiError(f"--device-id {device}: the PKI in {root} has certificates for "
                       f"{', '.join(devices)} (add it: certs init --force ... --device-id)")
    ports: dict[str, int] = pki["ports"]  # type: ignore[assignment]
    urls = {role: getattr(opts, f"{role}_url") or f"mqtts://localhost:{ports[role]}"
            for role in ("edge", "cloud")}
    for role, url in urls.items():
        if not url.startswith("mqtts://"):
            raise PkiError(f"--{role}-url {url}: with --certs the brokers speak TLS only; "
                           "use mqtts://")
    q = _quote
    tls = (f'ca_file = "{q(str(root / str(pki["ca"])))}"\n'
           f'cert_file = "{q(str(root / "clients" / f"device-{device}.pem"))}"\n'
           f'key_file = "{q(str(root / "clients" / f"device-{device}.key"))}"\n')
    done = replace(opts, site=site, device_id=device, edge_url=urls["edge"],
                   cloud_url=urls["cloud"])
    return done, tls


def _quote(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes; the template adds the quotes.
    return json.dumps(value)[1:-1]


def write_directory(opts: InitOptions) -> Path:
    """Create the directory; returns the config path. Refuses to overwrite without force."""
    tls = note = ""
    plain = plaintext_lines(opts) if opts.certs is None else {"edge": "", "cloud": ""}
    if opts.certs is not None:
        clients = opts.certs.resolve() / "clients"
        opts, tls = with_pki(opts)
        note = ("# Mutual TLS: the cloud broker lets only the cloud consumer read results, so "
                "run\n# iomt-agent receive ... --cert "
                f"{clients / 'cloud-consumer.pem'} --key {clients / 'cloud-consumer.key'}\n"
                "# and send scans as the gateway: iomt-agent send ... --cert "
                f"{clients / 'gateway.pem'} --key {clients / 'gateway.key'}\n")
    bundle = opts.bundle or default_bundle()
    if bundle is None:
        raise FileNotFoundError(
            f"no model bundle given and models/{BUNDLE_NAME} not found: pass --bundle PATH"
        )
    check_bundle(bundle)
    config_path = opts.directory / "agent.toml"
    if config_path.exists() and not opts.force:
        raise FileExistsError(f"{config_path} exists; pass --force to overwrite it")
    q = _quote
    text = TEMPLATE.format(
        edge_tls=tls or plain["edge"],
        cloud_tls=tls or plain["cloud"],
        receiver_note=note,
        site=q(opts.site),
        device_id=q(opts.device_id),
        edge_url=q(opts.edge_url),
        cloud_url=q(opts.cloud_url),
        protocol=q(opts.protocol),
        bundle=q(str(bundle.resolve())),
    )
    if (opts.fleet_group is None) != (opts.fleet_root is None):
        raise ConfigError("init flags", ["--fleet-group and --fleet-root go together"])
    if opts.fleet_root is not None:
        from agent.fleet.trusted_root import root_problem

        if (problem := root_problem(opts.fleet_root)) is not None:
            raise ConfigError("init flags", [f"--fleet-root {problem}"])
    if opts.fleet_group is not None:
        text += FLEET_TEMPLATE.format(group=q(opts.fleet_group))
    # Validate before writing anything, so a bad flag leaves nothing behind.
    parse_config(text, "agent.toml (from init flags)")
    if opts.directory.exists() and not opts.directory.is_dir():
        raise FileExistsError(f"{opts.directory} is a file: give a directory to create")
    key_dir = opts.directory / "keys"
    key_dir.mkdir(parents=True, exist_ok=True)
    state = opts.directory / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    state.chmod(0o700)  # the inbox holds scans (PHI); also when it existed (--force)
    ow = opts.force
    device = keys.generate_signing_key()
    keys.save_private_key(key_dir / "device-signing.key", device, overwrite=ow)
    keys.save_public_key(key_dir / "device-signing.pub", device.public_key(), overwrite=ow)
    recipient, recipient_pub = keys.generate_recipient_keypair(opts.recipient_kind)
    keys.save_private_key(key_dir / "cloud-recipient.key", recipient, overwrite=ow)
    keys.save_public_key(key_dir / "cloud-recipient.pub", recipient_pub, overwrite=ow)
    operator = keys.generate_signing_key()
    keys.save_private_key(key_dir / "operator.key", operator, overwrite=ow)
    keys.save_public_key(key_dir / "operator.pub", operator.public_key(), overwrite=ow)
    if not (key_dir / "site-deid.key").exists():  # kept on --force: pseudonyms stay stable
        create_site_secret(key_dir / "site-deid.key")
    if opts.fleet_root is not None:
        (opts.directory / "fleet").mkdir(exist_ok=True)
        shutil.copyfile(opts.fleet_root, opts.directory / "fleet" / "root.json")
    config_path.write_text(text, encoding="utf-8")
    return config_path
