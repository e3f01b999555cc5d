#!/bin/sh
# Check the FreeBSD port (packaging/freebsd) with the ports framework itself, on a host that
# is not FreeBSD: bmake reads a ports tree's Mk/ as FreeBSD 14.1 amd64 would, prints what
# INDEX and portlint read (make -V, make describe), stages the port from an sdist built from
# this checkout (nothing is fetched), and compares the packing list with the staged files.
#
# Usage: packaging/check-port.sh PORTSDIR [PYTHON]   (the port is staged with PREFIX=/opt/kvm)
#   PORTSDIR  a checkout of freebsd/freebsd-ports (Mk/, Templates/, UIDs, GIDs, lang/)
#   PYTHON    a python3.X with build, installer, setuptools>=77 and cffi (default python3)
# Needs bmake and mtree (Debian: bmake, mtree-netbsd). The FreeBSD commands the framework
# runs are stood in for below; what they cannot stand in for (check-plist's base mtree
# files and bsdtar, stage-qa's ELF checks, pkg) is not run.
set -eu
ports=$(cd "$1" && pwd)
python=$(command -v "${2:-python3}")
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/mk" "$work/bin" "$work/distfiles"

# FreeBSD's /usr/share/mk/bsd.port.mk: the ports tree's own.
echo ".include \"\${PORTSDIR}/Mk/bsd.port.mk\"" >"$work/mk/bsd.port.mk"
# sha256(1): "sha256 < FILE" (checksum.sh) prints the digest, "sha256 FILE" (makesum.sh)
# the distinfo line.
cat >"$work/bin/sha256" <<'EOF'
#!/bin/sh
if [ $# -eq 0 ]; then sha256sum | cut -d' ' -f1; exit; fi
echo "SHA256 ($1) = $(sha256sum "$1" | cut -d' ' -f1)"
EOF
# mktemp(1) -t PREFIX, stat(1) -f %z, sed(1) -i '': FreeBSD's options on GNU tools.
cat >"$work/bin/mktemp" <<'EOF'
#!/bin/sh
[ "${1-}" = -t ] && exec /usr/bin/mktemp -t "$2.XXXXXXXX"
exec /usr/bin/mktemp "$@"
EOF
cat >"$work/bin/stat" <<'EOF'
#!/bin/sh
[ "${1-}" = -f ] && [ "${2-}" = %z ] && shift 2 && exec /usr/bin/stat -c %s "$@"
exec /usr/bin/stat "$@"
EOF
cat >"$work/bin/sed" <<'EOF'
#!/bin/sh
[ $# -ge 2 ] && [ "$1" = -i ] && [ -z "$2" ] && shift 2 && exec /bin/sed -i "$@"
exec /bin/sed "$@"
EOF
# FreeBSD sh for Mk/Scripts: bash --posix has set -o pipefail (dash has not); bash's own
# GROUPS (the caller's gids) is unset, or do-users-groups.sh's GROUPS=$2 would not take.
cat >"$work/bin/sh" <<'EOF'
#!/bin/bash
script=$1
shift
exec /bin/bash --posix -c 'unset GROUPS; . "$0" "$@"' "$script" "$@"
EOF
chmod +x "$work/bin/"*
# The port's USERS and GROUPS as a committed port registers them in ports/UIDs and GIDs.
cp "$ports/UIDs" "$work/UIDs"
cp "$ports/GIDs" "$work/GIDs"
echo 'kvm_exporter:*:9429:9429::0:0:kvm_exporter:/nonexistent:/usr/sbin/nologin' >>"$work/UIDs"
echo 'kvm_exporter:*:9429:' >>"$work/GIDs"
# BSD.local.dist owns directories by group wheel, which Linux has not.
sed 's/gname=wheel/gname=root/g' "$ports/Templates/BSD.local.dist" >"$work/BSD.local.dist"
cp -R "$repo/packaging/freebsd" "$work/port"

version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
port() {
	(cd "$work/port" && PATH="$work/bin:$PATH" bmake -m "$work/mk" -m /usr/share/bmake/mk-bmake \
		PORTSDIR="$ports" OPSYS=FreeBSD OSVERSION=1401000 OSREL=14.1 ARCH=amd64 \
		UNAME_r=14.1-RELEASE _OSRELEASE=14.1-RELEASE LOCALBASE=/usr/local PREFIX=/opt/kvm \
		DEFAULT_VERSIONS="python=$version" PYTHON_CMD="$python" NO_DEPENDS=yes \
		WRKDIRPREFIX="$work/wrk" DISTDIR="$work/distfiles" UID_FILES="$work/UIDs" \
		GID_FILES="$work/GIDs" SH="$work/bin/sh" SHA256="$work/bin/sha256" \
		MKTEMP="$work/bin/mktemp" STAT="$work/bin/stat" MTREE_CMD=mtree \
		MTREE_FILE="$work/BSD.local.dist" INSTALL=install BINMODE=555 SHAREMODE=444 \
		MANMODE=444 BINOWN=root SHAREOWN=root BINGRP=root SHAREGRP=root MANGRP=root "$@")
}

for name in PKGNAME FLAVORS BUILD_DEPENDS RUN_DEPENDS PLIST_FILES USE_RC_SUBR USERS IGNORE; do
	printf '%s=%s\n' "$name" "$(port -V "$name")"
done
port describe
"$python" -m build --sdist --no-isolation --outdir "$work/distfiles" "$repo" >/dev/null
port makesum >/dev/null
port stage >/dev/null

stage=$(port -V STAGEDIR)
prefix=$(port -V PREFIX)
(cd "$stage$prefix" && find . -type f -o -type l | sed 's|^\./||' | sort) >"$work/staged"
sed -e 's|^@sample ||' -e 's|^@([^)]*) ||' -e "s|^$prefix/||" "$(port -V TMPPLIST)" |
	grep -v '^@' | sort >"$work/plist"
diff -u "$work/staged" "$work/plist"
echo "packing list: $(wc -l <"$work/plist") files, every staged file and no other"
# USE_RC_SUBR, SUB_FILES and post-patch write the port's PREFIX (not the default one, here)
# into what they install: the manual, the rc.d script and pkg-message.
gzip -dc "$stage$prefix/share/man/man8/kvm_exporter.8.gz" >"$work/kvm_exporter.8"
for text in "$work/kvm_exporter.8" "$stage$prefix/etc/rc.d/kvm_exporter" \
	"$(port -V WRKDIR)/pkg-message"; do
	if ! grep -q "$prefix/etc/kvm_exporter.yml" "$text" ||
		grep -n -e '%%' -e /usr/local/etc/kvm_exporter "$text"; then
		echo "${text##*/} does not name the configuration under $prefix" >&2
		exit 1
	fi
done
echo "port check passed"
