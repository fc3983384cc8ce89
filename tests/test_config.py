"""Tests for agent.config: the TOML schema, path resolution and key-path error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import BrokerConfig, Config, ConfigError, load_config, parse_config
from agent.ops.scaffold import InitOptions, write_directory
from tests.bundles import make_scale_bundle

VALID = """\
[agent]
site = "site-1"
device_id = "edge-1"

[edge]
url = "mqtt://edge.local:1883"
allow_plaintext = true

[cloud]
url = "mqtts://cloud.example.org"
protocol = "3.1.1"
ca_file = "certs/ca.pem"
password_file = "secrets/cloud.pw"
username = "edge-1"

[model]
bundle = "../bundles/scale"

[seal]
recipient_public_key = "keys/cloud.pub"
device_signing_key = "/etc/iomt/device.key"

[receiver]
recipient_private_key = "keys/cloud.key"
trusted_devices = { "edge-1" = "keys/edge-1.pub" }
"""


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "test.toml")
    assert ei.value.source == "test.toml"
    return ei.value.problems


def _replace(old: str, new: str) -> str:
    assert old in VALID
    return VALID.replace(old, new)


def test_valid_config_parses_with_defaults() -> None:
    cfg = parse_config(VALID)
    assert isinstance(cfg, Config)
    assert cfg.agent.site == "site-1" and cfg.agent.device_id == "edge-1"
    assert cfg.agent.state_dir == Path("state") and cfg.agent.shared_subscription is False
    assert cfg.edge.protocol == "5" and cfg.cloud.protocol == "3.1.1"
    assert cfg.limits.max_payload_bytes == 64 * 1024 * 1024
    assert cfg.limits.inbox_max_bytes == cfg.limits.outbox_max_bytes == 2048 * 1024 * 1024
    assert cfg.log.level == "info" and cfg.log.format == "auto"
    assert cfg.model.backend == "onnxruntime" and cfg.model.inter_op_threads == 1
    assert cfg.receiver is not None
    assert cfg.receiver.trusted_devices == {"edge-1": Path("keys/edge-1.pub")}
    # Without a base nothing is resolved.
    assert cfg.model.bundle == Path("../bundles/scale")


def test_scaffolded_config_loads(tmp_path: Path) -> None:
    bundle = make_scale_bundle(tmp_path / "bundle")
    path = write_directory(InitOptions(tmp_path / "node", "mqtt://127.0.0.1:1883",
                                       "mqtts://cloud.example.org:8884", site="ward-7",
                                       device_id="node-3", bundle=bundle))
    cfg = load_config(path)
    assert cfg.agent.site == "ward-7" and cfg.agent.device_id == "node-3"
    assert cfg.model.bundle == bundle.resolve()
    assert cfg.agent.state_dir == (tmp_path / "node" / "state").resolve()
    assert cfg.cloud.tls and cfg.cloud.port == 8884


def test_relative_paths_resolve_against_the_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc" / "iomt"
    conf_dir.mkdir(parents=True)
    (conf_dir / "agent.toml").write_text(VALID)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    cfg = load_config("../etc/iomt/agent.toml")
    base = conf_dir.resolve()
    assert cfg.agent.state_dir == base / "state"
    assert cfg.model.bundle == (tmp_path / "etc" / "bundles" / "scale").resolve()
    assert cfg.seal.recipient_public_key == base / "keys" / "cloud.pub"
    assert cfg.seal.device_signing_key == Path("/etc/iomt/device.key")  # absolute: kept
    assert cfg.cloud.ca_file == base / "certs" / "ca.pem"
    assert cfg.cloud.password_file == base / "secrets" / "cloud.pw"
    assert cfg.edge.ca_file is None and cfg.edge.cert_file is None
    assert cfg.receiver is not None
    assert cfg.receiver.recipient_private_key == base / "keys" / "cloud.key"
    assert cfg.receiver.trusted_devices == {"edge-1": base / "keys" / "edge-1.pub"}


def test_unknown_keys_are_named_by_path() -> None:
    text = _replace('device_id = "edge-1"', 'device_id = "edge-1"\ndevcie = "x"')
    text += '\n[limits]\ninbox_max_byte = 5\n\n[extra]\nfoo = 1\n'
    problems = _problems(text)
    assert len(problems) == 3, problems
    assert any(p.startswith("agent.devcie: unknown key") for p in problems)
    assert any(p.startswith("limits.inbox_max_byte: unknown key") for p in problems)
    assert any(p.startswith("extra: unknown key") for p in problems)


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ('url = "mqtt://edge.local:1883"', "url = 1883", "edge.url"),
        ('[edge]\n', '[edge]\nkeepalive_s = "thirty"\n', "edge.keepalive_s"),
        ('[edge]\n', "[edge]\nkeepalive_s = 2\n", "edge.keepalive_s"),  # below the minimum
        ('protocol = "3.1.1"', 'protocol = "4"', "cloud.protocol"),
        ('site = "site-1"', "site = 42", "agent.site"),
        ('[agent]\n', "[agent]\nshared_subscription = [1]\n", "agent.shared_subscription"),
        ('bundle = "../bundles/scale"', "bundle = 3", "model.bundle"),
        ('trusted_devices = { "edge-1" = "keys/edge-1.pub" }', 'trusted_devices = "x"',
         "receiver.trusted_devices"),
        ('trusted_devices = { "edge-1" = "keys/edge-1.pub" }', 'trusted_devices = { a = 1 }',
         "receiver.trusted_devices.a"),
    ],
)
def test_wrong_types_name_the_key_path(old: str, new: str, path: str) -> None:
    problems = _problems(_replace(old, new))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: "), problems


def test_a_protocol_written_as_a_number_says_to_quote_it() -> None:
    """TOML reads ``protocol = 5`` as an integer; "should be '5' (got 5)" reads as a riddle."""
    assert _problems(_replace('protocol = "3.1.1"', "protocol = 5")) == [
        'cloud.protocol: a number: write it in quotes, protocol = "5" (the versions are "5" '
        'and "3.1.1") (got 5)']


def test_wrong_log_level_and_section_type() -> None:
    problems = _problems(VALID + '\n[log]\nlevel = "verbose"\n')
    assert problems[0].startswith("log.level: ") and "verbose" in problems[0]
    problems = _problems(VALID.replace("[model]\n", "model = 5\n[x]\n"))
    assert any(p.startswith("model: ") for p in problems)


@pytest.mark.parametrize(
    "url",
    [
        "http://edge.local:1883",
        "https://edge.local",
        "edge.local:1883",
        "mqtt://",
        "mqtt://:1883",
        "mqtt://edge.local:99999",
        "mqtt://edge.local:port",
        "mqtt://edge.local:0",
        "mqtt://edge.local:1883/some/path",
        "mqtt://user:secret@edge.local:1883",
        "mqtt://edge.local:1883?tls=1",
    ],
)
def test_bad_broker_urls(url: str) -> None:
    problems = _problems(_replace('url = "mqtt://edge.local:1883"', f'url = "{url}"'))
    assert len(problems) == 1, problems
    assert problems[0].startswith("edge.url: "), problems
    with pytest.raises(ValueError, match="url"):
        BrokerConfig(url=url)
    if "://" not in url or url.startswith("http"):  # the error says the port is optional
        assert "mqtt://host[:port]" in problems[0] and "defaults to 1883" in problems[0]


@pytest.mark.parametrize("bad", ["a/b", "site+", "#", "+", "", "$SYS", "a b", "x" * 65])
@pytest.mark.parametrize("key", ["site", "device_id"])
def test_invalid_site_and_device_ids(key: str, bad: str) -> None:
    old = 'site = "site-1"' if key == "site" else 'device_id = "edge-1"'
    problems = _problems(_replace(old, f'{key} = "{bad}"'))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"agent.{key}: "), problems
    assert "not a valid topic level" in problems[0]


def test_every_problem_is_reported_at_once() -> None:
    text = (VALID.replace('site = "site-1"', 'site = "a/b"')
            .replace('url = "mqtt://edge.local:1883"', 'url = "http://x"')
            .replace('[model]\nbundle = "../bundles/scale"\n', ""))
    problems = _problems(text)
    paths = sorted(p.split(":")[0] for p in problems)
    assert paths == ["agent.site", "edge.url", "model"], problems
    assert any("model: required key is missing" in p for p in problems)


def test_render_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(VALID.replace('site = "site-1"', 'site = ""'), "/etc/iomt/agent.toml")
    text = ei.value.render()
    assert text.splitlines()[0] == "invalid configuration in /etc/iomt/agent.toml:"
    assert "  - agent.site: " in text
    assert str(ei.value).startswith("/etc/iomt/agent.toml: agent.site")


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(VALID + "\n[limits\nfoo = \n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert ei.value.source == str(path)
    assert len(ei.value.problems) == 1
    assert ei.value.problems[0].startswith("not valid TOML: ")
    assert "line" in ei.value.problems[0]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert ei.value.source == str(path)
    assert ei.value.problems == ["cannot read file: No such file or directory"]


def test_broker_defaults() -> None:
    # no port: MQTT's registered ones
    plain = BrokerConfig(url="mqtt://broker.local", allow_plaintext=True)
    assert (plain.host, plain.port, plain.tls) == ("broker.local", 1883, False)
    assert BrokerConfig(url="mqtt://127.0.0.1").port == 1883
    tls = BrokerConfig(url="mqtts://broker.local")
    assert (tls.host, tls.port, tls.tls) == ("broker.local", 8883, True)
    explicit = BrokerConfig(url="mqtts://10.0.0.7:18883/")
    assert (explicit.host, explicit.port, explicit.tls) == ("10.0.0.7", 18883, True)
    v6 = BrokerConfig(url="mqtt://[::1]:1884")
    assert (v6.host, v6.port) == ("::1", 1884)
    assert plain.protocol == "5" and plain.keepalive_s == 30
    assert plain.session_expiry_s == 7 * 24 * 3600
    assert plain.client_id is None and plain.username is None


def test_config_is_frozen() -> None:
    cfg = parse_config(VALID)
    with pytest.raises(ValueError, match="frozen"):
        cfg.agent.site = "other"  # type: ignore[misc]


def test_model_runtime_options_and_series_section() -> None:
    cfg = parse_config(VALID)
    assert cfg.model.onnx_providers == ["tensorrt", "cuda", "cpu"]
    assert cfg.model.graph_optimization == "all"
    assert (cfg.series.idle_timeout_s, cfg.series.max_open, cfg.series.max_slices) == (
        30.0, 8, 2048)
    text = _replace('bundle = "../bundles/scale"',
                    'bundle = "../bundles/scale"\nonnx_providers = ["cuda", "cpu"]\n'
                    'graph_optimization = "basic"') + "\n[series]\nidle_timeout_s = 5\n"
    cfg = parse_config(text)
    assert cfg.model.onnx_providers == ["cuda", "cpu"] and cfg.series.idle_timeout_s == 5
    problems = _problems(
        _replace('bundle = "../bundles/scale"',
                 'bundle = "../bundles/scale"\nonnx_providers = ["rocm"]\n'
                 'graph_optimization = "max"')
        + "\n[series]\nmax_open = 0\nidle = 3\n")
    joined = "\n".join(problems)
    assert "model.onnx_providers.0" in joined and "model.graph_optimization" in joined
    assert "series.max_open" in joined and "series.idle: unknown key" in joined


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST.", "gw.localhost", "127.0.0.1",
                                  "127.8.9.10", "[::1]"])
def test_plaintext_to_loopback_needs_no_permission(host: str) -> None:
    assert not BrokerConfig(url=f"mqtt://{host}:1884").tls


@pytest.mark.parametrize("host", ["edge.local", "10.0.0.7", "[fe80::1]", "localhost.example",
                                  "0.0.0.0"])
def test_plaintext_off_loopback_is_refused_unless_allowed(host: str) -> None:
    text = _replace('url = "mqtt://edge.local:1883"\nallow_plaintext = true',
                    f'url = "mqtt://{host}:1883"')
    problems = _problems(text)
    assert len(problems) == 1
    assert problems[0].startswith("edge: ") and "not loopback" in problems[0]
    assert "mqtts://" in problems[0] and "allow_plaintext = true" in problems[0]
    assert "{" not in problems[0]  # the section's values are not dumped into the message
    allowed = parse_config(text.replace(f'"mqtt://{host}:1883"',
                                        f'"mqtt://{host}:1883"\nallow_plaintext = true'))
    assert allowed.edge.allow_plaintext and not allowed.edge.tls
    assert BrokerConfig(url=f"mqtts://{host}:8883").tls  # TLS needs no permission


def test_deid_section_defaults_options_and_key_paths(tmp_path: Path) -> None:
    cfg = parse_config(VALID, base=tmp_path)
    assert cfg.deid.enabled  # on by default
    assert cfg.deid.secret_file == tmp_path / "keys" / "site-deid.key"
    assert not (cfg.deid.retain_modified_dates or cfg.deid.retain_patient_characteristics
                or cfg.deid.retain_device_identity)
    text = VALID + ('[deid]\nenabled = false\nsecret_file = "/etc/iomt/deid.key"\n'
                    "retain_modified_dates = true\nretain_patient_characteristics = true\n"
                    "retain_device_identity = true\n")
    cfg = parse_config(text, base=tmp_path)
    assert not cfg.deid.enabled and cfg.deid.secret_file == Path("/etc/iomt/deid.key")
    assert cfg.deid.retain_modified_dates and cfg.deid.retain_device_identity
    problems = _problems(VALID + '[deid]\nretain_dates = true\nenabled = "sometimes"\n')
    assert any(p.startswith("deid.retain_dates: unknown key") for p in problems)
    assert any(p.startswith("deid.enabled:") for p in problems)
    for name, info in type(cfg.deid).model_fields.items():
        assert info.title and info.description, name
