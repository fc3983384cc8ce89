#!/usr/bin/env bash
# Install, upgrade or remove the IoMT edge agent as a systemd service. Safe to run again:
# every step checks what is there first. See docs/deploy.md.
#
#   sudo systemd/install.sh [options]               install or upgrade, enable, (re)start
#   sudo systemd/install.sh --uninstall [--purge]   remove; --purge also deletes data and keys
#
# Packagers and tests: DESTDIR=/stage (or --destdir) puts every file under /stage and skips
# useradd, chown to a user that does not exist, and the live systemctl calls (the unit is
# enabled with `systemctl --root`).
set -euo pipefail
# The venv must see only itself (a caller's PYTHONPATH would make pip skip the install).
unset PYTHONPATH PYTHONHOME

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/opt/iomt-agent}"
UNITDIR="${UNITDIR:-/etc/systemd/system}"
CONFDIR=/etc/iomt-agent
STATEDIR=/var/lib/iomt-agent
SERVICE=iomt-agent.service
GATEWAY_SERVICE=iomt-gateway.service  # installed, not enabled: docs/integration.md
SERVICE_USER=iomt-agent
SERVICE_GROUP=""
PYTHON="${PYTHON:-python3}"
FROM="$SRC"
PIP_ARGS=""
BUNDLE=""
RECIPIENT_KEY=""
SITE="site-1"
DEVICE_ID="$(hostname -s 2>/dev/null | tr -c 'A-Za-z0-9_.\n-' '-' || true)"
DEVICE_ID="${DEVICE_ID:-edge-1}"
EDGE_URL="mqtt://localhost:1883"
CLOUD_URL="mqtts://cloud.example.invalid:8883"
URLS_GIVEN=""
MODE=install
PURGE=no
START=yes

usage() {
    cat <<EOF
usage: install.sh [options]            install or upgrade (idempotent)
       install.sh --uninstall [--purge]

  --prefix DIR          software location (default /opt/iomt-agent): venv, models, docs
  --destdir DIR         stage everything under DIR (also: DESTDIR=DIR); no useradd/systemctl
  --unitdir DIR         unit directory (default /etc/systemd/system)
  --user NAME           service user (default iomt-agent); --group NAME (default: same)
  --python PY           interpreter for the venv, 3.11 or newer (default python3)
  --from SPEC           what pip installs (default: this source tree; or a wheel file)
  --pip-args "ARGS"     extra pip arguments, e.g. "--no-index --find-links /media/wheels"
  --bundle DIR          model bundle to install (default: models/t1w-to-t2w-lite if built)
  --recipient-key FILE  the cloud's HPKE public key (-> $CONFDIR/cloud-recipient.pub)
  --site S --device-id D --edge-url URL --cloud-url URL
                        values for a new agent.toml (an existing one is never overwritten)
  --no-start            enable, but do not (re)start the service
  --uninstall           remove the service and software; keep config, keys and data
  --purge               with --uninstall: also delete $CONFDIR, $STATEDIR and the user
EOF
}

die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'install.sh: %s\n' "$*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="${2:?}"; shift ;;
        --destdir) DESTDIR="${2:?}"; shift ;;
        --unitdir) UNITDIR="${2:?}"; shift ;;
        --user) SERVICE_USER="${2:?}"; shift ;;
        --group) SERVICE_GROUP="${2:?}"; shift ;;
        --python) PYTHON="${2:?}"; shift ;;
        --from) FROM="${2:?}"; shift ;;
        --pip-args) PIP_ARGS="${2?}"; shift ;;
        --bundle) BUNDLE="${2:?}"; shift ;;
        --recipient-key) RECIPIENT_KEY="${2:?}"; shift ;;
        --site) SITE="${2:?}"; shift ;;
        --device-id) DEVICE_ID="${2:?}"; shift ;;
        --edge-url) EDGE_URL="${2:?}"; URLS_GIVEN="$URLS_GIVEN edge"; shift ;;
        --cloud-url) CLOUD_URL="${2:?}"; URLS_GIVEN="$URLS_GIVEN cloud"; shift ;;
        --no-start) START=no ;;
        --uninstall) MODE=uninstall ;;
        --purge) PURGE=yes ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done
SERVICE_GROUP="${SERVICE_GROUP:-$SERVICE_USER}"
for level in "$SITE" "$DEVICE_ID"; do
    [[ "$level" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] \
        || die "'$level': a site or device id is 1-64 of A-Z a-z 0-9 _ . - (starting alphanumeric)"
done
url_re='^mqtts?://[][A-Za-z0-9_.:-]+$'
for url in "$EDGE_URL" "$CLOUD_URL"; do
    [[ "$url" =~ $url_re ]] || die "'$url': expected mqtt://host[:port] or mqtts://host[:port] (the port defaults to 1883 for mqtt, 8883 for mqtts)"
done
[ "$PURGE" = no ] || [ "$MODE" = uninstall ] || die "--purge goes with --uninstall"

# Paths must be absolute and never a system directory: uninstall removes PREFIX.
for dir in "$PREFIX" "$UNITDIR"; do
    case "$dir" in /*) ;; *) die "$dir: expected an absolute path" ;; esac
done
case "${PREFIX%/}" in
    ""|/usr|/usr/local|/opt|/etc|/var|/home|/root) die "--prefix $PREFIX: use a directory of its own" ;;
esac
if [ -n "$DESTDIR" ]; then
    DESTDIR="$(mkdir -p "$DESTDIR" && cd "$DESTDIR" && pwd)"
    [ "$DESTDIR" != / ] || DESTDIR=""
fi
LIVE=yes
[ -z "$DESTDIR" ] || LIVE=no
D="$DESTDIR"  # messages name files where they are: under the stage when there is one
VENV="$PREFIX/venv"

if [ "$LIVE" = yes ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo $0 ...), or stage with --destdir DIR"
fi

# Ownership: only root can chown, and only to a user that exists (in a DESTDIR build the
# package's own scripts create the user and set ownership).
CAN_CHOWN=no
if [ "$(id -u)" = 0 ] && getent passwd "$SERVICE_USER" >/dev/null 2>&1 \
        && getent group "$SERVICE_GROUP" >/dev/null 2>&1; then
    CAN_CHOWN=yes
fi

# install_dir MODE OWNER:GROUP DIR   (creates or fixes; never touches what is inside)
install_dir() {
    mkdir -p "$3"
    chmod "$1" "$3"
    own "$2" "$3"
}
own() {
    if [ "$CAN_CHOWN" = yes ] || { [ "$(id -u)" = 0 ] && [ "$1" = root:root ]; }; then
        chown "$1" "$2"
    fi
}
# install_file MODE OWNER:GROUP SRC DEST   (atomic replace)
install_file() {
    local tmp
    tmp="$(dirname "$4")/.$(basename "$4").tmp.$$"
    cp "$3" "$tmp"
    chmod "$1" "$tmp"
    own "$2" "$tmp"
    mv -f "$tmp" "$4"
}

systemctl_live() {
    if [ "$LIVE" = yes ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl "$@"
    else
        return 0
    fi
}

# -- uninstall -------------------------------------------------------------------------
uninstall() {
    if [ "$LIVE" = yes ]; then
        systemctl_live disable --now "$SERVICE" "$GATEWAY_SERVICE" 2>/dev/null || true
    elif command -v systemctl >/dev/null 2>&1 && [ -e "$D$UNITDIR/$SERVICE" ]; then
        systemctl --root="$D" disable "$SERVICE" >/dev/null 2>&1 || true
    fi
    rm -f "$D$UNITDIR/multi-user.target.wants/$SERVICE"
    rm -f "$D$UNITDIR/$SERVICE" "$D$UNITDIR/$SERVICE.d/credentials.conf" \
        "$D$UNITDIR/$GATEWAY_SERVICE"
    if [ "$PURGE" = yes ]; then
        rm -rf "$D$UNITDIR/$SERVICE.d"
    else
        rmdir "$D$UNITDIR/$SERVICE.d" 2>/dev/null || true
    fi
    systemctl_live daemon-reload
    rm -rf "${D}${PREFIX:?}"
    say "removed $SERVICE and $D$PREFIX"
    if [ "$PURGE" = yes ]; then
        rm -rf "$D$CONFDIR" "$D$STATEDIR"
        if [ "$LIVE" = yes ] && getent passwd "$SERVICE_USER" >/dev/null 2>&1; then
            userdel "$SERVICE_USER" || say "could not remove user $SERVICE_USER"
            if getent group "$SERVICE_GROUP" >/dev/null 2>&1; then
                groupdel "$SERVICE_GROUP" 2>/dev/null || true
            fi
        fi
        say "purged $D$CONFDIR (config and keys), $D$STATEDIR (inbox/outbox) and user" \
            "$SERVICE_USER"
    else
        say "kept $D$CONFDIR (config and keys) and $D$STATEDIR (inbox/outbox; may hold" \
            "results not yet delivered); remove them with --uninstall --purge"
    fi
}

# -- install ---------------------------------------------------------------------------
create_user() {
    if [ "$LIVE" = no ]; then
        return 0
    fi
    if ! getent group "$SERVICE_GROUP" >/dev/null 2>&1; then
        groupadd --system "$SERVICE_GROUP"
    fi
    if ! getent passwd "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --gid "$SERVICE_GROUP" --home-dir "$STATEDIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "IoMT edge agent" "$SERVICE_USER"
        say "created system user $SERVICE_USER"
    fi
    CAN_CHOWN=yes
}

install_software() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
        || die "$PYTHON: Python 3.11 or newer is required (pass --python PY; see docs/deploy.md)"
    install_dir 0755 root:root "$D$PREFIX"
    if ! "$D$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        rm -rf "${D}${VENV:?}"
        "$PYTHON" -m venv "$D$VENV" \
            || die "cannot create a venv: install python3-venv (apt install python3-venv)"
        say "created virtual environment $D$VENV"
    fi
    # Dependencies as needed, then the agent itself always (an upgrade from a source tree
    # may keep the version number, and pip would then skip it).
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
    "$D$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade \
        $PIP_ARGS "$FROM"
    # shellcheck disable=SC2086
    "$D$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --force-reinstall $PIP_ARGS "$FROM"
    chmod -R u=rwX,go=rX "$D$VENV"
    say "installed $("$D$VENV/bin/python" -c 'import importlib.metadata as m; print("iomt-edge-agent", m.version("iomt-edge-agent"))') into $D$VENV"
    if [ -f "$SRC/docs/deploy.md" ]; then
        install_dir 0755 root:root "$D$PREFIX/docs"
        install_file 0644 root:root "$SRC/docs/deploy.md" "$D$PREFIX/docs/deploy.md"
    fi
}

BUNDLE_NAME=t1w-to-t2w-lite
install_bundle() {
    if [ -z "$BUNDLE" ] && [ -f "$SRC/models/$BUNDLE_NAME/bundle.json" ]; then
        BUNDLE="$SRC/models/$BUNDLE_NAME"
    fi
    if [ -z "$BUNDLE" ]; then
        say "no model bundle given and models/$BUNDLE_NAME is not built: agent.toml points" \
            "at $PREFIX/models/$BUNDLE_NAME; copy a bundle to $D$PREFIX/models/$BUNDLE_NAME" \
            "or rerun with --bundle DIR"
        return 0
    fi
    [ -f "$BUNDLE/bundle.json" ] || die "--bundle $BUNDLE: no bundle.json there"
    BUNDLE_NAME="$(basename "$(cd "$BUNDLE" && pwd)")"
    local dest="$D$PREFIX/models/$BUNDLE_NAME"
    install_dir 0755 root:root "$D$PREFIX/models"
    rm -rf "$dest.new"
    cp -R "$BUNDLE" "$dest.new"
    chmod -R u=rwX,go=rX "$dest.new"
    [ "$(id -u)" != 0 ] || chown -R root:root "$dest.new"
    rm -rf "$dest"
    mv "$dest.new" "$dest"
    say "installed model bundle $BUNDLE_NAME into $dest"
}

generate_device_key() {
    local key="$1"
    if command -v openssl >/dev/null 2>&1; then
        (umask 077 && openssl genpkey -algorithm ED25519 -out "$key")
    else
        (umask 077 && "$D$VENV/bin/python" - "$key" <<'PY'
import sys
from pathlib import Path
from agent import keys
keys.save_private_key(Path(sys.argv[1]), keys.generate_signing_key())
PY
)
    fi
    say "generated the device signing key (register $D$CONFDIR/device-signing.pub with the" \
        "cloud)"
}

# The site's de-identification secret (deid.secret_file): 32 random bytes as 64 hex digits.
# Every node of one site needs the same file: copy it from the first node into
# credentials/site-deid.key before installing the others.
generate_site_secret() {
    local secret="$1"
    (umask 077 && "$D$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32))' \
        >"$secret")
    say "generated the de-identification secret $D$CONFDIR/credentials/site-deid.key (copy" \
        "it to the site's other nodes)"
}

public_key_of() {
    if command -v openssl >/dev/null 2>&1; then
        openssl pkey -in "$1" -pubout -out "$2"
    else
        "$D$VENV/bin/python" - "$1" "$2" <<'PY'
import sys
from pathlib import Path
from agent import keys
keys.save_public_key(Path(sys.argv[2]), keys.load_signing_key(Path(sys.argv[1])).public_key())
PY
    fi
}

# What a new agent.toml still needs: the broker URLs that were not given.
urls_to_edit() {
    local missing=""
    case "$URLS_GIVEN" in *edge*) ;; *) missing="edge.url ($EDGE_URL)" ;; esac
    case "$URLS_GIVEN" in
        *cloud*) ;;
        *) missing="${missing:+$missing and }cloud.url ($CLOUD_URL)" ;;
    esac
    [ -z "$missing" ] || printf ' (edit %s, then run the doctor)' "$missing"
}

install_config() {
    local conf="$D$CONFDIR" creds="$D$CONFDIR/credentials"
    install_dir 0750 "root:$SERVICE_GROUP" "$conf"
    install_dir 0700 root:root "$creds"
    if [ ! -e "$conf/agent.toml" ]; then
        local tmp
        tmp="$(mktemp)"
        sed -e "s|@SITE@|$SITE|g" -e "s|@DEVICE_ID@|$DEVICE_ID|g" \
            -e "s|@EDGE_URL@|$EDGE_URL|g" -e "s|@CLOUD_URL@|$CLOUD_URL|g" \
            -e "s|@PREFIX@|$PREFIX|g" -e "s|@BUNDLE_NAME@|$BUNDLE_NAME|g" \
            "$SRC/systemd/agent.toml.in" >"$tmp"
        install_file 0640 "root:$SERVICE_GROUP" "$tmp" "$conf/agent.toml"
        rm -f "$tmp"
        say "wrote $D$CONFDIR/agent.toml$(urls_to_edit)"
    else
        chmod 0640 "$conf/agent.toml"
        own "root:$SERVICE_GROUP" "$conf/agent.toml"
        say "kept $D$CONFDIR/agent.toml"
    fi
    if [ ! -e "$creds/device-signing.key" ]; then
        generate_device_key "$creds/device-signing.key"
    fi
    if [ ! -e "$creds/site-deid.key" ]; then
        generate_site_secret "$creds/site-deid.key"
    fi
    # Secrets: root only; systemd copies them for the service (LoadCredential=).
    local f
    for f in "$creds"/* "$creds"/.[!.]*; do
        [ -f "$f" ] || continue
        chmod 0600 "$f"
        own root:root "$f"
    done
    if [ ! -e "$conf/device-signing.pub" ]; then
        public_key_of "$creds/device-signing.key" "$conf/device-signing.pub"
    fi
    chmod 0644 "$conf/device-signing.pub"
    own root:root "$conf/device-signing.pub"
    if [ -n "$RECIPIENT_KEY" ]; then
        install_file 0644 root:root "$RECIPIENT_KEY" "$conf/cloud-recipient.pub"
    fi
    if [ ! -e "$conf/cloud-recipient.pub" ]; then
        say "missing $D$CONFDIR/cloud-recipient.pub: get the cloud's recipient public key" \
            "from the cloud operator (rerun with --recipient-key FILE)"
    fi
}

# One LoadCredential= per extra secret in credentials/ (passwords, TLS client keys); the
# unit itself loads device-signing.key and site-deid.key.
install_credentials_dropin() {
    local dropin="$D$UNITDIR/$SERVICE.d" lines="" f name
    for f in "$D$CONFDIR/credentials"/*; do
        [ -f "$f" ] || continue
        name="$(basename "$f")"
        case "$name" in device-signing.key|site-deid.key) continue ;; esac
        case "$name" in
            *[!A-Za-z0-9_.-]*) say "skipping credentials/$name: use letters, digits, . _ -"; continue ;;
        esac
        lines="${lines}LoadCredential=$name:$CONFDIR/credentials/$name"$'\n'
    done
    if [ -n "$lines" ]; then
        install_dir 0755 root:root "$dropin"
        local tmp
        tmp="$(mktemp)"
        printf '# Written by install.sh from the files in %s/credentials/.\n[Service]\n%s' \
            "$CONFDIR" "$lines" >"$tmp"
        install_file 0644 root:root "$tmp" "$dropin/credentials.conf"
        rm -f "$tmp"
    else
        rm -f "$dropin/credentials.conf"
        rmdir "$dropin" 2>/dev/null || true
    fi
}

install_unit() {
    install_dir 0700 "$SERVICE_USER:$SERVICE_GROUP" "$D$STATEDIR"
    install_dir 0755 root:root "$D$UNITDIR"
    local tmp
    tmp="$(mktemp)"
    local unit
    for unit in "$SERVICE" "$GATEWAY_SERVICE"; do
        sed -e "s|/opt/iomt-agent|$PREFIX|g" \
            -e "s|^User=iomt-agent$|User=$SERVICE_USER|" \
            -e "s|^Group=iomt-agent$|Group=$SERVICE_GROUP|" \
            "$SRC/systemd/$unit" >"$tmp"
        install_file 0644 root:root "$tmp" "$D$UNITDIR/$unit"
    done
    rm -f "$tmp"
    install_credentials_dropin
    if [ "$LIVE" = yes ]; then
        systemctl_live daemon-reload
        systemctl_live enable "$SERVICE"
        if [ "$START" = yes ] && [ -e "$CONFDIR/cloud-recipient.pub" ]; then
            # --no-block: READY=1 waits for both brokers, which may take a while.
            systemctl_live restart --no-block "$SERVICE"
            say "(re)started $SERVICE: systemctl status iomt-agent; journalctl -u iomt-agent"
        else
            say "enabled $SERVICE; start it with: systemctl start iomt-agent"
        fi
    elif command -v systemctl >/dev/null 2>&1; then
        systemctl --root="$D" enable "$SERVICE" >/dev/null 2>&1 \
            || say "systemctl --root could not enable $SERVICE; the package must enable it"
    fi
}

if [ "$MODE" = uninstall ]; then
    uninstall
    exit 0
fi
create_user
install_software
install_bundle
install_config
install_unit
if [ "$LIVE" = yes ]; then
    say "check the node with: sudo $VENV/bin/iomt-agent doctor --config $CONFDIR/agent.toml"
else
    say "staged under $D; on the target, check the node with:" \
        "sudo $VENV/bin/iomt-agent doctor --config $CONFDIR/agent.toml"
fi
