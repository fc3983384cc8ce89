"""systemd/install.sh into a temporary root (DESTDIR), and the unit file under
systemd-analyze. Nothing here touches the real system: with DESTDIR set the script skips
useradd/userdel and the live systemctl calls."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.crypto import keys
from agent.crypto.site_secret import load_site_secret
from tests.bundles import make_scale_bundle

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "systemd" / "install.sh"
UNIT = REPO / "systemd" / "iomt-agent.service"
MAX_EXPOSURE = 1.5


def _owner() -> tuple[str, str]:
    """A user and group that exist here but are not root, to see chown at work."""
    if os.geteuid() == 0:
        # not nobody: systemd-analyze verify rightly warns about User=nobody
        for user, group in (("daemon", "daemon"), ("bin", "bin")):
            try:
                pwd.getpwnam(user)
                grp.getgrnam(group)
            except KeyError:
                continue
            return user, group
    return pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name


USER, GROUP = _owner()


@dataclass
class Staged:
    root: Path
    args: list[str]
    output: str = ""  # what the first install printed

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def install(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_install(self.root, *self.args, *extra, check=check)


def run_install(destdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DESTDIR", "PREFIX", "UNITDIR")}
    proc = subprocess.run(["bash", str(INSTALL), "--destdir", str(destdir), *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def build_wheel(src: Path, out: Path, marker: str = "") -> Path:
    """The agent as a wheel, built from a copy of the tree (no build/ left in the repo)."""
    src.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "agent", src / "agent",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if marker:
        with (src / "agent" / "__init__.py").open("a") as f:
            f.write(f"# {marker}\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=120)
    return next(out.glob("iomt_edge_agent-*.whl"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Staged:
    work = tmp_path_factory.mktemp("inputs")
    bundle = make_scale_bundle(work / "test-scale")
    _, recipient_pub = keys.generate_recipient_keypair("x25519")
    keys.save_public_key(work / "recipient.pub", recipient_pub)
    args = ["--python", sys.executable, "--from", str(wheel), "--pip-args",
            "--no-deps --no-index", "--user", USER, "--group", GROUP, "--bundle", str(bundle),
            "--recipient-key", str(work / "recipient.pub"), "--site", "st-marys",
            "--device-id", "node-7", "--edge-url", "mqtts://scanner-gw.local:8883",
            "--cloud-url", "mqtts://cloud.example:8883"]
    root = tmp_path_factory.mktemp("root")
    return Staged(root, args, run_install(root, *args).stdout)


@pytest.fixture
def copy_of(staged: Staged, tmp_path: Path) -> Staged:
    """A private copy of the staged tree, for tests that change it."""
    root = tmp_path / "root"
    shutil.copytree(staged.root, root, symlinks=True)
    return Staged(root, staged.args, staged.output)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def owner(p: Path) -> tuple[str, str]:
    st = p.lstat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name


# -- the staged install --------------------------------------------------------------------


def test_layout_modes_and_ownership(staged: Staged) -> None:
    s = staged.path
    expect = {
        "/etc/iomt-agent": (0o750, ("root", GROUP)),
        "/etc/iomt-agent/agent.toml": (0o640, ("root", GROUP)),
        "/etc/iomt-agent/credentials": (0o700, ("root", "root")),
        "/etc/iomt-agent/credentials/device-signing.key": (0o600, ("root", "root")),
        "/etc/iomt-agent/credentials/site-deid.key": (0o600, ("root", "root")),
        "/etc/iomt-agent/device-signing.pub": (0o644, ("root", "root")),
        "/etc/iomt-agent/cloud-recipient.pub": (0o644, ("root", "root")),
        "/var/lib/iomt-agent": (0o700, (USER, GROUP)),
        "/etc/systemd/system/iomt-agent.service": (0o644, ("root", "root")),
        "/opt/iomt-agent/venv": (0o755, ("root", "root")),
        "/opt/iomt-agent/models/test-scale/bundle.json": (0o644, ("root", "root")),
        "/opt/iomt-agent/docs/deploy.md": (0o644, ("root", "root")),
    }
    for path, (want_mode, want_owner) in expect.items():
        assert s(path).exists(), path
        assert mode(s(path)) == want_mode, f"{path}: {mode(s(path)):o}"
        if os.geteuid() == 0:
            assert owner(s(path)) == want_owner, path
    wants = s("/etc/systemd/system/multi-user.target.wants/iomt-agent.service")
    if shutil.which("systemctl"):
        assert os.readlink(wants) == "/etc/systemd/system/iomt-agent.service"


def test_venv_holds_the_agent(staged: Staged) -> None:
    python = staged.path("/opt/iomt-agent/venv/bin/python")
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('iomt-edge-agent'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version)
    assert staged.path("/opt/iomt-agent/venv/bin/iomt-agent").is_file()
    unit = staged.path("/etc/systemd/system/iomt-agent.service").read_text()
    assert ("ExecStart=/opt/iomt-agent/venv/bin/iomt-agent run --config "
            "/etc/iomt-agent/agent.toml") in unit


def test_config_from_template(staged: Staged) -> None:
    text = staged.path("/etc/iomt-agent/agent.toml").read_text()
    assert "@" not in text.replace("${", "")  # every placeholder filled
    config = parse_config(text, "agent.toml")
    assert (config.agent.site, config.agent.device_id) == ("st-marys", "node-7")
    assert config.edge.url == "mqtts://scanner-gw.local:8883"
    assert config.cloud.url == "mqtts://cloud.example:8883"
    assert config.model.bundle == Path("/opt/iomt-agent/models/test-scale")
    assert config.agent.state_dir == Path("/var/lib/iomt-agent")
    assert str(config.seal.device_signing_key) == "${CREDENTIALS_DIRECTORY}/device-signing.key"
    # the generated device key is a real Ed25519 key, its public half next to the config
    key = keys.load_signing_key(staged.path("/etc/iomt-agent/credentials/device-signing.key"))
    pub = keys.load_verify_key(staged.path("/etc/iomt-agent/device-signing.pub"))
    assert key.public_key() == pub
    unit = staged.path("/etc/systemd/system/iomt-agent.service").read_text()
    assert ("LoadCredential=device-signing.key:/etc/iomt-agent/credentials/device-signing.key"
            in unit)
    # de-identification on, keyed by the generated site secret that the unit hands over
    assert config.deid.enabled
    assert str(config.deid.secret_file) == "${CREDENTIALS_DIRECTORY}/site-deid.key"
    assert len(load_site_secret(staged.path("/etc/iomt-agent/credentials/site-deid.key"))) == 32
    assert "LoadCredential=site-deid.key:/etc/iomt-agent/credentials/site-deid.key" in unit


def test_messages_name_the_staged_paths(staged: Staged) -> None:
    root = str(staged.root)
    lines = staged.output.splitlines()
    assert f"install.sh: wrote {root}/etc/iomt-agent/agent.toml" in lines  # URLs were given
    assert f"install.sh: created virtual environment {root}/opt/iomt-agent/venv" in lines
    assert "install.sh: installed model bundle test-scale into " \
        f"{root}/opt/iomt-agent/models/test-scale" in lines
    assert f"install.sh: staged under {root}; on the target, check the node with: sudo " \
        "/opt/iomt-agent/venv/bin/iomt-agent doctor --config /etc/iomt-agent/agent.toml" \
        in lines
    for line in lines[:-1]:  # the last one is the command for the target
        paths = re.findall(r"(?<![\w.:/])/[\w./-]+", line)
        assert all(p.startswith(root) for p in paths), line


def test_rerun_is_idempotent_and_keeps_edits(copy_of: Staged, tmp_path: Path) -> None:
    s = copy_of.path
    # an upgrade that keeps the version number still replaces the code
    newer = build_wheel(tmp_path / "src", tmp_path / "wheels", marker="upgrade-marker-42")
    from_arg = copy_of.args.index("--from") + 1
    copy_of.args = [*copy_of.args[:from_arg], str(newer), *copy_of.args[from_arg + 1:]]
    config = s("/etc/iomt-agent/agent.toml")
    key = s("/etc/iomt-agent/credentials/device-signing.key")
    edited = config.read_text().replace('level = "info"', 'level = "debug"')
    config.write_text(edited)
    key_bytes = key.read_bytes()
    key.chmod(0o644)  # a mistake the next run repairs
    (s("/etc/iomt-agent/credentials") / "edge.password").write_text("secret\n")
    out = copy_of.install().stdout
    assert f"kept {copy_of.root}/etc/iomt-agent/agent.toml\n" in out
    installed = next(s("/opt/iomt-agent/venv/lib").glob("python3*/site-packages/agent/__init__.py"))
    assert "upgrade-marker-42" in installed.read_text()
    assert config.read_text() == edited
    assert key.read_bytes() == key_bytes
    assert mode(key) == 0o600
    assert mode(s("/etc/iomt-agent/credentials/edge.password")) == 0o600
    dropin = s("/etc/systemd/system/iomt-agent.service.d/credentials.conf").read_text()
    assert "[Service]\nLoadCredential=edge.password:/etc/iomt-agent/credentials/edge.password\n" \
        in dropin
    s("/etc/iomt-agent/credentials/edge.password").unlink()
    copy_of.install()
    assert not s("/etc/systemd/system/iomt-agent.service.d").exists()


def test_uninstall_keeps_data_and_keys_unless_purge(copy_of: Staged) -> None:
    s = copy_of.path
    (s("/var/lib/iomt-agent") / "agent.db").write_bytes(b"results not yet delivered")
    out = copy_of.install("--uninstall").stdout
    assert f"kept {copy_of.root}/etc/iomt-agent (config and keys)" in out
    assert not s("/opt/iomt-agent").exists()
    assert not s("/etc/systemd/system/iomt-agent.service").exists()
    assert not s("/etc/systemd/system/multi-user.target.wants/iomt-agent.service").is_symlink()
    assert s("/etc/iomt-agent/agent.toml").is_file()
    assert s("/etc/iomt-agent/credentials/device-signing.key").is_file()
    assert s("/var/lib/iomt-agent/agent.db").is_file()
    copy_of.install("--uninstall")  # again: nothing left to do, still fine
    copy_of.install("--uninstall", "--purge")
    assert not s("/etc/iomt-agent").exists()
    assert not s("/var/lib/iomt-agent").exists()


def test_prefix_for_packagers(tmp_path: Path, wheel: Path, staged: Staged) -> None:
    root = tmp_path / "root"
    # an existing venv is reused (saves creating one again here)
    shutil.copytree(staged.path("/opt/iomt-agent/venv"), root / "usr/lib/iomt-agent/venv",
                    symlinks=True)
    out = run_install(root, "--python", sys.executable, "--from", str(wheel), "--pip-args",
                      "--no-deps --no-index", "--prefix", "/usr/lib/iomt-agent",
                      "--unitdir", "/usr/lib/systemd/system", "--user", USER,
                      "--group", GROUP).stdout
    # no URLs given: the new agent.toml has the defaults, which the message names
    assert f"wrote {root}/etc/iomt-agent/agent.toml (edit edge.url (mqtt://localhost:1883) " \
        "and cloud.url (mqtts://cloud.example.invalid:8883), then run the doctor)" in out
    unit = (root / "usr/lib/systemd/system/iomt-agent.service").read_text()
    assert "ExecStart=/usr/lib/iomt-agent/venv/bin/iomt-agent run" in unit
    assert f"User={USER}\n" in unit and f"Group={GROUP}\n" in unit
    assert (root / "usr/lib/iomt-agent/venv/bin/iomt-agent").is_file()
    config = parse_config((root / "etc/iomt-agent/agent.toml").read_text())
    assert config.model.bundle == Path("/usr/lib/iomt-agent/models/t1w-to-t2w-lite")


@pytest.mark.parametrize(("args", "message"), [
    (["--site", "a/b"], "a site or device id"),
    (["--edge-url", "http://x"], "expected mqtt://host[:port]"),
    (["--prefix", "/usr"], "use a directory of its own"),
    (["--prefix", "relative"], "expected an absolute path"),
    (["--purge"], "--purge goes with --uninstall"),
    (["--frobnicate"], "unknown option"),
])
def test_bad_arguments_change_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_install(tmp_path / "root", *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    root = tmp_path / "root"
    assert not root.exists() or not any(root.iterdir())


# -- systemd-analyze -------------------------------------------------------------------------


def _systemd_analyze() -> tuple[str, int] | None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    match = re.match(r"systemd (\d+)", out)
    return (exe, int(match.group(1))) if match else None


ANALYZE = _systemd_analyze()
needs_analyze = pytest.mark.skipif(
    ANALYZE is None or ANALYZE[1] < 250,
    reason="systemd-analyze 250+ not installed (security --offline needs 250; "
    "apt-get install systemd)")


def exposure(unit: Path, root: Path | None = None) -> float:
    assert ANALYZE is not None
    cmd = [ANALYZE[0], "security", "--offline=true", "--no-pager"]
    if root is not None:
        cmd.append(f"--root={root}")
    proc = subprocess.run([*cmd, str(unit)], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


@needs_analyze
def test_unit_exposure_at_most_1_5(staged: Staged) -> None:
    assert exposure(UNIT) <= MAX_EXPOSURE
    installed = staged.path("/etc/systemd/system/iomt-agent.service")
    assert exposure(installed, staged.root) <= MAX_EXPOSURE


@needs_analyze
def test_verify_prints_no_warning(staged: Staged, tmp_path: Path) -> None:
    """`systemd-analyze verify --root` on the installed unit: the targets it names, and the
    /bin/kill of its ExecReload=, come from the host (a real install has them)."""
    assert ANALYZE is not None
    root = tmp_path / "root"
    shutil.copytree(staged.root, root, symlinks=True)
    host_units = next((d for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                       if (d / "multi-user.target").exists()), None)
    if host_units is None:
        pytest.skip("no systemd unit directory on this host to take the targets from")
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for target in ("sysinit.target", "basic.target", "network-online.target",
                   "time-sync.target", "multi-user.target", "shutdown.target"):
        if (host_units / target).exists():
            shutil.copy2(host_units / target, units / target)
    kill = next((p for p in (Path("/bin/kill"), Path("/usr/bin/kill")) if p.exists()), None)
    if kill is None:
        pytest.skip("no /bin/kill on this host to give the staged root")
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy2(kill, root / "bin" / "kill")
    proc = subprocess.run([ANALYZE[0], "verify", f"--root={root}",
                           "/etc/systemd/system/iomt-agent.service"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == ""


@needs_analyze
def test_verify_would_catch_a_warning(tmp_path: Path) -> None:
    """The check above is not vacuous: an unknown key is reported."""
    assert ANALYZE is not None
    bad = tmp_path / "iomt-agent.service"
    bad.write_text(UNIT.read_text().replace("UMask=0077", "UMask=0077\nProtectEverything=yes")
                   .replace("/opt/iomt-agent/venv/bin/iomt-agent", "/bin/true"))
    proc = subprocess.run([ANALYZE[0], "verify", str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert "Unknown key" in proc.stderr + proc.stdout


def test_unit_settings_the_agent_relies_on() -> None:
    unit = UNIT.read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"] == "2"
    assert settings["SyslogIdentifier"] == "iomt-agent"
    assert settings["StateDirectory"] == settings["ConfigurationDirectory"] == "iomt-agent"
    assert "ProcSubset" not in settings  # hides /proc/cpuinfo from onnxruntime
    assert "AF_UNIX" in settings["RestrictAddressFamilies"]  # sd_notify
    # onnxruntime pins its threads; denied, it logs an error line on every start
    assert "SystemCallFilter=sched_setaffinity" in unit
    watchdog = int(settings["WatchdogSec"].removesuffix("s"))
    assert watchdog >= 30  # the loop turns at least once a second; slow slices need room


GATEWAY_UNIT = REPO / "systemd" / "iomt-gateway.service"


@needs_analyze
def test_gateway_unit_exposure_at_most_1_5(staged: Staged) -> None:
    assert exposure(GATEWAY_UNIT) <= MAX_EXPOSURE
    installed = staged.path("/etc/systemd/system/iomt-gateway.service")
    assert exposure(installed, staged.root) <= MAX_EXPOSURE


def test_gateway_unit_hardened_like_the_agents() -> None:
    """Every sandboxing line of the agent's unit is in the gateway's (which adds
    ProcSubset=pid: it runs no model runtime that reads /proc/cpuinfo)."""
    agent = dict(re.findall(r"^(\w+)=(.*)$", UNIT.read_text(), re.M))
    gateway_text = GATEWAY_UNIT.read_text()
    gateway = dict(re.findall(r"^(\w+)=(.*)$", gateway_text, re.M))
    sandbox = [k for k in agent if k.startswith(("Protect", "Private", "Restrict", "NoNew",
                                                "Capability", "Ambient", "Lock", "Memory",
                                                "SystemCallArch", "RemoveIPC", "Keyring",
                                                "Device", "UMask"))]
    for key in sandbox:
        assert gateway.get(key) == agent[key], key
    assert "SystemCallFilter=~@privileged @resources" in gateway_text
    assert gateway["ProcSubset"] == "pid"
    assert gateway["Type"] == "notify" and gateway["RestartPreventExitStatus"] == "2"
    assert gateway["ExecStart"].endswith("iomt-agent gateway --config /etc/iomt-agent/agent.toml")
    assert gateway["User"] == agent["User"] and gateway["StateDirectory"] == "iomt-agent"
