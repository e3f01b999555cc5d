#!/bin/sh
# Write the FreeBSD port's files/kvm_exporter.in from the repository's rc.d/kvm_exporter.
# The port's USE_RC_SUBR turns %%PREFIX%% back into the install prefix (/usr/local by
# default), so the installed script is the repository's, whatever the prefix.
# Usage: packaging/make-rc-in.sh > packaging/freebsd/files/kvm_exporter.in
set -eu
sed -e 's|/usr/local|%%PREFIX%%|g' "$(dirname "$0")/../rc.d/kvm_exporter"
