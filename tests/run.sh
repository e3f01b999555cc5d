#!/bin/sh
# Install everything the test suite needs on Debian, then run lint, type checks and every test.
# Usage: tests/run.sh [pytest args...]   (as root, or with sudo available)
set -eu
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# prometheus: server and promtool; shellcheck: rc.d lint; python3-venv: the venv below;
# gcc/libc6-dev: the fake libkvm; openssl: test certificates; procps: ps to compare with;
# systemd: systemd-analyze for the unit; mandoc: the manual page lint;
# prometheus-process-exporter: the peer that resource and group tests compare with;
# prometheus-node-exporter: reads the exporter's node_* names through its textfile collector;
# git: the revision a build records and a checkout reports; strace: the system calls the
# systemd unit's filter must allow; tcsh/csh: root's login shell under su(1) in the rc.d
# tests (csh on FreeBSD 13 and older).
PACKAGES="prometheus prometheus-process-exporter prometheus-node-exporter shellcheck mandoc
    python3 python3-venv python3-dev gcc libc6-dev openssl procps systemd ca-certificates git
    strace tcsh csh"
# Waits for another apt-get holding the dpkg lock; a new machine may have no package lists yet.
apt_install() {
    # shellcheck disable=SC2086 # a list of words
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
        install -y -q --no-install-recommends $PACKAGES >/dev/null
}
apt_install || { $SUDO apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null && apt_install; }

# Debian's python (not one under /root) so that tests can run the exporter as nobody.
VENV="${KVM_EXPORTER_TEST_VENV:-/opt/kvm_exporter-test-venv}"
$SUDO /usr/bin/python3 -m venv "$VENV"
$SUDO "$VENV/bin/pip" install -q --upgrade pip
$SUDO "$VENV/bin/pip" install -q ".[test]"

"$VENV/bin/ruff" check kvm_exporter tests bench
"$VENV/bin/ruff" format --check kvm_exporter tests bench
"$VENV/bin/mypy" kvm_exporter
PATH="$VENV/bin:$PATH" "$VENV/bin/pytest" -p no:cacheprovider "$@" tests
