"""Tests for agent.scaffold.write_directory (``iomt-agent init``)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.crypto import keys, seal
from agent.crypto.site_secret import load_site_secret
from agent.ops.scaffold import InitOptions, write_directory
from tests.bundles import make_scale_bundle

PRIVATE = ("device-signing.key", "cloud-recipient.key", "operator.key")
SECRET = "site-deid.key"  # the de-identification secret: kept on --force
PUBLIC = ("device-signing.pub", "cloud-recipient.pub", "operator.pub")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scale_bundle(tmp_path_factory.mktemp("bundle") / "scale")


def _opts(directory: Path, bundle: Path, **kw: object) -> InitOptions:
    args: dict[str, object] = {
        "directory": directory,
        "edge_url": "mqtt://127.0.0.1:1883",
        "cloud_url": "mqtts://cloud.example.org",
        "bundle": bundle,
    }
    args.update(kw)
    return InitOptions(**args)  # type: ignore[arg-type]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_a_loadable_directory(tmp_path: Path, bundle: Path) -> None:
    node = tmp_path / "node"
    path = write_directory(_opts(node, bundle, site="ward-7", device_id="node-3",
                                 protocol="3.1.1"))
    assert path == node / "agent.toml"
    cfg = load_config(path)
    base = node.resolve()
    assert (cfg.agent.site, cfg.agent.device_id) == ("ward-7", "node-3")
    assert cfg.edge.url == "mqtt://127.0.0.1:1883" and cfg.edge.protocol == "3.1.1"
    assert cfg.cloud.tls and cfg.cloud.port == 8883 and cfg.cloud.protocol == "3.1.1"
    assert cfg.model.bundle == bundle.resolve()
    assert cfg.model.backend == "auto"  # the fastest runtime x precision that passes the guard
    assert cfg.agent.state_dir == base / "state" and cfg.agent.state_dir.is_dir()
    assert cfg.seal.recipient_public_key == base / "keys" / "cloud-recipient.pub"
    assert cfg.seal.device_signing_key == base / "keys" / "device-signing.key"
    assert cfg.receiver is not None
    assert cfg.receiver.trusted_devices == {"node-3": base / "keys" / "device-signing.pub"}
    assert cfg.receiver.recipient_private_key == base / "keys" / "cloud-recipient.key"


def test_key_files_modes_and_pairs(tmp_path: Path, bundle: Path) -> None:
    node = tmp_path / "node"
    cfg = load_config(write_directory(_opts(node, bundle, recipient_kind="x25519")))
    kdir = node / "keys"
    assert sorted(p.name for p in kdir.iterdir()) == sorted((*PRIVATE, *PUBLIC, SECRET))
    for name in (*PRIVATE, SECRET):
        assert _mode(kdir / name) == 0o600, name
    assert cfg.deid.enabled and cfg.deid.secret_file == kdir / SECRET
    assert len(load_site_secret(kdir / SECRET)) == 32
    for name in PUBLIC:
        assert _mode(kdir / name) == 0o644, name
    # The files hold matching pairs: what the edge seals, the configured receiver opens.
    assert cfg.receiver is not None
    recipient = keys.load_recipient_private_key(cfg.receiver.recipient_private_key)
    assert recipient.kind == "x25519"
    envelope = seal.seal(b"result", recipient=keys.load_recipient_public_key(
        cfg.seal.recipient_public_key), signing_key=keys.load_signing_key(
        cfg.seal.device_signing_key), device_id=cfg.agent.device_id, message_id="m")
    opened = seal.open_envelope(
        envelope, recipients={recipient.key_id: recipient},
        trusted_devices={d: keys.load_verify_key(p)
                         for d, p in cfg.receiver.trusted_devices.items()})
    assert opened.plaintext == b"result"
    operator = keys.load_signing_key(kdir / "operator.key")
    assert operator.public_key() == keys.load_verify_key(kdir / "operator.pub")


def test_default_recipient_kind_is_hybrid(tmp_path: Path, bundle: Path) -> None:
    write_directory(_opts(tmp_path / "n", bundle))
    key = keys.load_recipient_private_key(tmp_path / "n" / "keys" / "cloud-recipient.key")
    assert key.kind == "mlkem768-x25519"


def test_refuses_to_overwrite_without_force(tmp_path: Path, bundle: Path) -> None:
    node = tmp_path / "node"
    path = write_directory(_opts(node, bundle, site="first"))
    before = {p: p.read_bytes() for p in node.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="--force"):
        write_directory(_opts(node, bundle, site="second"))
    assert {p: p.read_bytes() for p in node.rglob("*") if p.is_file()} == before

    write_directory(_opts(node, bundle, site="second", force=True))
    assert load_config(path).agent.site == "second"
    for name in PRIVATE + PUBLIC:  # fresh keys, same modes
        assert (node / "keys" / name).read_bytes() != before[node / "keys" / name]
    # ... but the same de-identification secret: the site's pseudonyms stay the same
    assert (node / "keys" / SECRET).read_bytes() == before[node / "keys" / SECRET]
    assert _mode(node / "keys" / "device-signing.key") == 0o600


@pytest.mark.parametrize(
    "kw",
    [{"site": "a/b"}, {"site": "#"}, {"device_id": "dev+1"}, {"device_id": ""},
     {"edge_url": "http://x:1883"}, {"cloud_url": "mqtt://:1"}, {"protocol": "4"}],
)
def test_bad_flags_leave_nothing_written(tmp_path: Path, bundle: Path,
                                         kw: dict[str, str]) -> None:
    node = tmp_path / "node"
    with pytest.raises(ConfigError) as ei:
        write_directory(_opts(node, bundle, **kw))
    assert ei.value.problems
    assert not node.exists()


def test_bad_site_does_not_touch_an_existing_directory(tmp_path: Path, bundle: Path) -> None:
    node = tmp_path / "node"
    node.mkdir()
    (node / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"agent\.site"):
        write_directory(_opts(node, bundle, site="bad/site"))
    assert [p.name for p in node.iterdir()] == ["notes.txt"]


def test_missing_bundle_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.ops.scaffold.default_bundle", lambda: None)
    with pytest.raises(FileNotFoundError, match="--bundle"):
        write_directory(_opts(tmp_path / "node", None))  # type: ignore[arg-type]
    assert not (tmp_path / "node").exists()


def test_the_reference_bundle_is_found_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent.ops.scaffold import default_bundle

    monkeypatch.chdir(tmp_path)  # not the checkout: found beside the package
    found = default_bundle()
    assert found is not None and (found / "bundle.json").is_file()
    assert found.name == "t1w-to-t2w-lite"


def test_plaintext_off_loopback_needs_the_flag_and_then_says_so_in_the_file(
        tmp_path: Path, bundle: Path) -> None:
    """The refusal names init's own flag (not a config key the user has no file for yet)."""
    node = tmp_path / "node"
    with pytest.raises(ConfigError) as ei:
        write_directory(_opts(node, bundle, edge_url="mqtt://gateway.example:1883"))
    assert ei.value.problems == [
        "--edge-url mqtt://gateway.example:1883: plaintext MQTT to a host that is not loopback:"
        " use mqtts:// with --certs PKI_DIR (`iomt-agent certs init` makes a development PKI),"
        " or pass --allow-plaintext"]
    assert not node.exists()
    path = write_directory(_opts(node, bundle, edge_url="mqtt://gateway.example:1883",
                                 allow_plaintext=True))
    config = load_config(path)
    assert config.edge.allow_plaintext and not config.cloud.allow_plaintext


def test_a_bundle_whose_files_do_not_match_their_digests_is_refused(
        tmp_path: Path, bundle: Path) -> None:
    import shutil

    from agent.model.bundle import BundleError

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    model = next(p for p in copy.iterdir() if p.suffix in (".onnx", ".tflite"))
    model.write_bytes(model.read_bytes() + b"x")
    with pytest.raises(BundleError, match=rf"^--bundle {copy}: .*{model.name} has sha256"):
        write_directory(_opts(tmp_path / "node", copy))
    assert not (tmp_path / "node").exists()
