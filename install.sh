#!/usr/bin/env bash
# Install jmix-agent from this checkout as a systemd service on Debian 12. Run as root.
#
# Running it again upgrades the application and repairs directory permissions. It never
# overwrites an existing config or private key. See `./install.sh --help` for the options.
set -euo pipefail

readonly PROG=install.sh
readonly SERVICE=jmix-agent
readonly SERVICE_USER=jmix-agent
readonly DEFAULT_PREFIX=/opt/jmix-agent
readonly CONFIG_DIR=/etc/jmix-agent
readonly CONFIG_FILE=$CONFIG_DIR/agent.toml
readonly STATE_DIR=/var/lib/jmix-agent
readonly KEY_DIR=$STATE_DIR/keys
readonly SFTP_KEY=$KEY_DIR/sftp_ed25519
readonly LOG_DIR=/var/log/jmix-agent
readonly DATA_DIR=/srv/jmix-agent
readonly UNIT_FILE=/etc/systemd/system/$SERVICE.service
readonly COMMAND_LINK=/usr/local/bin/jmix-agent
readonly PYTHON=/usr/bin/python3
# Runtime packages, the build dependencies of systemd-python (the [systemd] extra), and the
# optional tools: DCMTK to send test studies, the OpenSSH client for SFTP keys and checks.
readonly APT_PACKAGES=(python3 python3-venv python3-dev gcc pkg-config libsystemd-dev
                       dcmtk openssh-client)

SOURCE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SOURCE_DIR

prefix=$DEFAULT_PREFIX
root=""
use_apt=1
uninstall=0
purge=0

usage() {
    cat <<EOF
usage: $PROG [OPTIONS]

Install jmix-agent as a systemd service: Debian packages, the system user $SERVICE_USER,
a virtual environment with the agent, $CONFIG_FILE (only if absent), the state, log and
data directories, the agent's keys (only if absent) and the unit $UNIT_FILE.
Run as root. Running it again upgrades the agent and keeps config and keys.

options:
  --prefix DIR   install the virtual environment into DIR/venv (default: $DEFAULT_PREFIX)
  --no-apt       do not install Debian packages; they must be present already
  --uninstall    stop and disable the service, remove the unit, the virtual environment and
                 the $COMMAND_LINK link; keep config, keys, spool and logs
  --purge        with --uninstall: also delete $CONFIG_DIR, $STATE_DIR (keys and spool),
                 $LOG_DIR and the service user; the folders in $DATA_DIR are
                 deleted only if they are empty
  --root DIR     write every file below DIR instead of /, for trying this script out and
                 for tests. Implies --no-apt, creates no user, runs no systemctl, and leaves
                 files owned by the invoking user. The result cannot be copied onto a
                 machine, because a virtual environment contains its own absolute path.
  -h, --help     show this help
EOF
}

info() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

parse_args() {
    while (($#)); do
        case $1 in
            --prefix)
                (($# >= 2)) || die "--prefix needs a directory"
                prefix=$2
                shift 2
                ;;
            --root)
                (($# >= 2)) || die "--root needs a directory"
                root=$2
                shift 2
                ;;
            --no-apt) use_apt=0; shift ;;
            --uninstall) uninstall=1; shift ;;
            --purge) purge=1; shift ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; die "unknown option: $1" ;;
        esac
    done

    # The prefix ends up in ExecStart= and in a sed expression, so keep it to plain characters.
    [[ $prefix =~ ^/[A-Za-z0-9._/-]+$ ]] \
        || die "--prefix must be an absolute path of letters, digits and . _ / -, got '$prefix'"
    prefix=${prefix%/}
    if [[ -n $root ]]; then
        [[ $root == /* ]] || die "--root must be an absolute path, got '$root'"
        root=${root%/}
        [[ -n $root ]] || die "--root / is the default; omit --root to install into /"
        [[ -d $root ]] || die "--root directory $root does not exist; create it first"
        use_apt=0
    fi
    if ((purge && !uninstall)); then
        die "--purge only works together with --uninstall"
    fi
}

# Print PATH as it is seen from this script: below --root when one is given.
target() { printf '%s%s' "$root" "$1"; }

# True when this script manages the real system rather than a --root tree.
system_install() { [[ -z $root ]]; }

# True when systemd is the running init system, detected as sd_booted(3) does it.
systemd_running() { system_install && [[ -d /run/systemd/system ]]; }

# Run a command as the service user, or as the invoking user under --root.
as_service_user() {
    if system_install; then
        # The service user may not be allowed into the current directory.
        (cd / && runuser -u "$SERVICE_USER" -- "$@")
    else
        "$@"
    fi
}

# Create directory PATH (below --root) with MODE and OWNER:GROUP, or fix them if it exists.
# Under --root the owner stays the invoking user.
ensure_dir() {
    local path mode=$2 owner=$3
    path=$(target "$1")
    if system_install; then
        install -d -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$path"
    else
        install -d -m "$mode" "$path"
    fi
}

# Create directory PATH like ensure_dir, but leave an existing one as the admin set it up.
create_dir_if_missing() {
    if [[ ! -d $(target "$1") ]]; then
        ensure_dir "$@"
    fi
}

check_environment() {
    if system_install && ((EUID != 0)); then
        die "run as root (or use --root DIR to try the installation in a scratch directory)"
    fi
    if ((use_apt)) && ! command -v apt-get >/dev/null; then
        die "apt-get not found; this script expects Debian 12. Install the packages" \
            "${APT_PACKAGES[*]} yourself and pass --no-apt"
    fi
}

install_packages() {
    if ((!use_apt)); then
        info "skipping Debian packages (--no-apt or --root)"
        return
    fi
    info "installing Debian packages: ${APT_PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "apt-get update failed; check the network and the APT sources," \
        "or install the packages yourself and pass --no-apt"
    apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}" \
        || die "apt-get install failed for: ${APT_PACKAGES[*]}"
}

create_service_user() {
    if ! system_install; then
        info "skipping the service user (--root); files stay owned by $(id -un)"
        return
    fi
    if ! getent group "$SERVICE_USER" >/dev/null; then
        info "creating system group $SERVICE_USER"
        groupadd --system "$SERVICE_USER"
    fi
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        info "creating system user $SERVICE_USER (home $STATE_DIR, no login shell)"
        useradd --system --gid "$SERVICE_USER" --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "jmix-agent service" "$SERVICE_USER"
    fi
}

install_application() {
    local venv build_dir
    venv=$(target "$prefix/venv")
    [[ -x $PYTHON ]] || die "$PYTHON not found; install python3 and python3-venv or drop --no-apt"

    if [[ ! -x $venv/bin/python ]]; then
        info "creating virtual environment $venv"
        install -d -m 0755 "$(dirname "$venv")"
        "$PYTHON" -m venv "$venv"
    fi

    # Build from a private copy so that the checkout gets no root-owned build/ or egg-info
    # files, and so that a developer's .venv and caches are not copied along.
    build_dir=$(mktemp -d)
    # shellcheck disable=SC2064  # expand build_dir now: it is local to this function
    trap "rm -rf '$build_dir'" EXIT
    tar -C "$SOURCE_DIR" --exclude=./.git --exclude=./.venv --exclude=./build \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=.mypy_cache \
        --exclude=.ruff_cache --exclude=.pytest_cache -cf - . | tar -C "$build_dir" -xf -

    # pip reinstalls a project given as a directory even when its version did not change,
    # so an upgrade always replaces the agent's code.
    info "installing jmix-agent with the [systemd] extra into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${build_dir}[systemd]" \
        || die "pip install failed; it needs access to PyPI or to the index that pip.conf names"
    rm -rf "$build_dir"
    trap - EXIT

    # A link on PATH, so that admins can type `jmix-agent`. Another file there is kept.
    local link command="$prefix/venv/bin/jmix-agent"
    link=$(target "$COMMAND_LINK")
    if [[ ! -e $link && ! -L $link ]] || [[ $(readlink "$link") == "$command" ]]; then
        install -d -m 0755 "$(dirname "$link")"
        ln -sfn "$command" "$link"
    else
        warn "$link exists and is not a link to $command; leaving it alone"
    fi
}

install_config() {
    ensure_dir "$CONFIG_DIR" 0750 "root:$SERVICE_USER"
    local config
    config=$(target "$CONFIG_FILE")
    if [[ -e $config ]]; then
        info "keeping existing config $config"
        return
    fi
    info "installing example config to $config (mode 0640, root:$SERVICE_USER)"
    if system_install; then
        install -m 0640 -o root -g "$SERVICE_USER" "$SOURCE_DIR/etc/jmix-agent/agent.toml" "$config"
    else
        install -m 0640 "$SOURCE_DIR/etc/jmix-agent/agent.toml" "$config"
    fi
}

create_directories() {
    # The state and key directories contain the private keys, so their mode and owner are
    # reset on every run. systemd also creates the state and log directories (StateDirectory=,
    # LogsDirectory=), but keygen below needs them before the first start.
    ensure_dir "$STATE_DIR" 0700 "$SERVICE_USER:$SERVICE_USER"
    ensure_dir "$KEY_DIR" 0700 "$SERVICE_USER:$SERVICE_USER"
    ensure_dir "$LOG_DIR" 0750 "$SERVICE_USER:$SERVICE_USER"
    # Drop and import folders are shared with other programs, so an existing folder keeps the
    # permissions an admin gave it. New files in drop/ get the group jmix-agent (setgid), so
    # a writer only needs to be a member of that group.
    create_dir_if_missing "$DATA_DIR" 0755 root:root
    create_dir_if_missing "$DATA_DIR/drop" 2770 "$SERVICE_USER:$SERVICE_USER"
    create_dir_if_missing "$DATA_DIR/import" 0750 "$SERVICE_USER:$SERVICE_USER"
}

# Print the signing and encryption key paths that the installed config names, one a line,
# as paths on the target system. Relative paths resolve against $CONFIG_DIR.
configured_key_paths() {
    "$(target "$prefix/venv/bin/python")" - "$(target "$CONFIG_FILE")" "$CONFIG_FILE" <<'EOF'
import sys
from pathlib import Path

from agent.config import ConfigError, parse_config

try:
    config = parse_config(Path(sys.argv[1]).read_text(encoding="utf-8"), Path(sys.argv[2]))
except (OSError, ConfigError) as exc:
    sys.exit(str(exc))
print(config.identity.signing_key)
print(config.identity.encryption_key)
EOF
}

generate_keys() {
    local jmix_agent paths signing encryption
    jmix_agent=$(target "$prefix/venv/bin/jmix-agent")
    if ! paths=$(configured_key_paths); then
        warn "cannot read the key paths from $(target "$CONFIG_FILE"); fix the config, then" \
            "create the keys with: runuser -u $SERVICE_USER -- $prefix/venv/bin/jmix-agent keygen"
        return
    fi
    signing=$(target "$(sed -n 1p <<<"$paths")")
    encryption=$(target "$(sed -n 2p <<<"$paths")")

    if [[ -e $signing && -e $encryption ]]; then
        info "keeping existing keys $signing and $encryption"
    elif [[ -e $signing || -e $encryption ]]; then
        warn "only one of $signing and $encryption exists; not generating keys, because that" \
            "would replace the existing one. Restore the missing key from a backup, or replace" \
            "both with: jmix-agent keygen --force (peers then need the new identity card)"
    else
        info "generating the agent's signing and encryption keys"
        if ! as_service_user "$jmix_agent" keygen --signing-key "$signing" \
            --encryption-key "$encryption"; then
            warn "key generation failed; the service user must be able to write" \
                "$(dirname "$signing") and $(dirname "$encryption")"
        fi
    fi

    local sftp_key
    sftp_key=$(target "$SFTP_KEY")
    if [[ -e $sftp_key ]]; then
        info "keeping existing SFTP client key $sftp_key"
    elif command -v ssh-keygen >/dev/null; then
        info "generating the SFTP client key $sftp_key"
        if ! as_service_user ssh-keygen -q -t ed25519 -N '' -C "$SERVICE_USER@$(hostname)" \
            -f "$sftp_key"; then
            warn "ssh-keygen failed; create the SFTP client key $SFTP_KEY by hand"
        fi
    else
        warn "ssh-keygen not found (package openssh-client); no SFTP client key created"
    fi
}

install_unit() {
    local unit
    unit=$(target "$UNIT_FILE")
    info "installing systemd unit $unit"
    install -d -m 0755 "$(dirname "$unit")"
    sed "s|$DEFAULT_PREFIX/venv/bin/jmix-agent|$prefix/venv/bin/jmix-agent|" \
        "$SOURCE_DIR/systemd/$SERVICE.service" >"$unit.tmp"
    chmod 0644 "$unit.tmp"
    mv "$unit.tmp" "$unit"

    if systemd_running; then
        systemctl daemon-reload
        systemctl enable "$SERVICE.service"
        if systemctl is-active --quiet "$SERVICE.service"; then
            warn "$SERVICE is still running the previous version; restart it with:" \
                "systemctl restart $SERVICE"
        fi
    fi
}

print_next_steps() {
    local command="$prefix/venv/bin/jmix-agent"
    cat <<EOF

jmix-agent is installed. Next steps:
  1. Edit $CONFIG_FILE: set [identity] id and name, add [[peers]] and [[routes]].
     Check it with: runuser -u $SERVICE_USER -- $command check-config
  2. Print this agent's peer card and send it to every peer:
       runuser -u $SERVICE_USER -- $command identity
     Give each SFTP peer the public key $SFTP_KEY.pub for its authorized_keys.
EOF
    if systemd_running; then
        cat <<EOF
  3. Start the service and follow its log:
       systemctl start $SERVICE
       journalctl -u $SERVICE -f
EOF
    elif system_install; then
        cat <<EOF
  3. systemd is not running as PID 1 here, so the unit was installed but not enabled.
     On a machine booted with systemd, run:
       systemctl daemon-reload && systemctl enable --now $SERVICE
       journalctl -u $SERVICE -f
     Without systemd, run the agent in the foreground:
       runuser -u $SERVICE_USER -- $command run
EOF
    else
        cat <<EOF
  3. This was a --root installation into $root: nothing was enabled or started.
EOF
    fi
}

uninstall() {
    if systemd_running && [[ -e $UNIT_FILE ]]; then
        info "stopping and disabling $SERVICE"
        systemctl disable --now "$SERVICE.service" || warn "systemctl disable failed; continuing"
    fi
    local unit
    unit=$(target "$UNIT_FILE")
    if [[ -e $unit ]]; then
        info "removing $unit"
        rm -f "$unit"
        if systemd_running; then
            systemctl daemon-reload
            systemctl reset-failed "$SERVICE.service" 2>/dev/null || true
        fi
    fi

    local link
    link=$(target "$COMMAND_LINK")
    if [[ -L $link && $(readlink "$link") == "$prefix/venv/bin/jmix-agent" ]]; then
        rm -f "$link"
    fi
    local venv
    venv=$(target "$prefix/venv")
    if [[ -d $venv ]]; then
        info "removing $venv"
        rm -rf "$venv"
    fi
    rmdir "$(target "$prefix")" 2>/dev/null || true

    if ((!purge)); then
        info "kept $(target "$CONFIG_DIR"), $(target "$STATE_DIR") (keys, spool)," \
            "$(target "$LOG_DIR") and $(target "$DATA_DIR"); --purge deletes them"
        return
    fi

    info "purging $(target "$CONFIG_DIR"), $(target "$STATE_DIR") and $(target "$LOG_DIR")"
    rm -rf "$(target "$CONFIG_DIR")" "$(target "$STATE_DIR")" "$(target "$LOG_DIR")"
    local folder
    for folder in "$DATA_DIR/drop" "$DATA_DIR/import" "$DATA_DIR"; do
        if [[ -d $(target "$folder") ]] && ! rmdir "$(target "$folder")" 2>/dev/null; then
            warn "kept $(target "$folder") because it is not empty"
        fi
    done
    if system_install && getent passwd "$SERVICE_USER" >/dev/null; then
        info "deleting system user $SERVICE_USER"
        userdel "$SERVICE_USER"
    fi
    if system_install && getent group "$SERVICE_USER" >/dev/null; then
        groupdel "$SERVICE_USER"
    fi
}

main() {
    parse_args "$@"
    check_environment
    # Files in the virtual environment must be readable by the service user, whatever umask
    # root has. Private files are created with explicit modes below.
    umask 0022

    if ((uninstall)); then
        uninstall
        info "uninstalled"
        return
    fi

    install_packages
    create_service_user
    install_application
    install_config
    create_directories
    generate_keys
    install_unit
    print_next_steps
}

main "$@"
