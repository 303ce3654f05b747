#!/bin/bash
# Build a small Gentoo-shaped image, split the way Portage's estrip does it
# (FEATURES="splitdebug installsources"): debugedit -i -s salts each build-id
# and rewrites DW_AT_comp_dir to /usr/src/debug/${CATEGORY}/${PF}, objcopy
# --only-keep-debug writes usr/lib/debug/<path>.debug (one per inode, so a
# hardlinked binary gets a hardlinked .debug), .build-id/xx/ links point at
# both, and the sources debugedit listed are copied to usr/src/debug.
#
# usage: estrip-image.sh IMAGE [CC] [compressdebug]
set -euo pipefail
image=$(realpath -m "$1")
cc=${2:-gcc}
compress=${3:-}
CATEGORY=app-misc PF=hello-1.0 SLOT=0
prefix=${cc%gcc}
objcopy=${prefix}objcopy strip=${prefix}strip
command -v "$objcopy" >/dev/null || objcopy=objcopy strip=strip
sources_dir=/usr/src/debug/${CATEGORY}/${PF}

WORKDIR=$(mktemp -d)
trap 'rm -rf "$WORKDIR"' EXIT
S=$WORKDIR/$PF
mkdir -p "$S" "$image/usr/bin" "$image/usr/lib"
cat > "$S/greet.h" <<'C'
int greet(const char *who);
C
cat > "$S/greet.c" <<'C'
#include <stdio.h>
#include "greet.h"
int greet(const char *who) { return printf("hello, %s\n", who); }
C
cat > "$S/hello.c" <<'C'
#include "greet.h"
__attribute__((noinline)) static int twice(int x) { return 2 * x; }
int main(int argc, char **argv) { greet(argc > 1 ? argv[1] : "world"); return twice(argc) - 2 * argc; }
C
(
	cd "$S"
	"$cc" -g -O2 -fPIC -shared -Wl,--build-id -Wl,-soname,libgreet.so.1 -o libgreet.so.1 greet.c
	"$cc" -g -O2 -Wl,--build-id -o hello hello.c ./libgreet.so.1
)
install -m 0755 "$S/hello" "$image/usr/bin/hello"
ln "$image/usr/bin/hello" "$image/usr/bin/hello-again"
install -m 0755 "$S/libgreet.so.1" "$image/usr/lib/libgreet.so.1"

: > "$WORKDIR/sources.list"
declare -A debug_of_inode
for elf in "$image/usr/bin/hello" "$image/usr/bin/hello-again" "$image/usr/lib/libgreet.so.1"; do
	rel=${elf#"$image"/}
	dst=$image/usr/lib/debug/$rel.debug
	mkdir -p "$(dirname "$dst")"
	inode=$(stat -c %i "$elf")
	if [[ -n ${debug_of_inode[$inode]:-} ]]; then
		ln "${debug_of_inode[$inode]}" "$dst"   # estrip: ln -L "${inode_debug}"
		continue
	fi
	debug_of_inode[$inode]=$dst
	buildid=$(debugedit -i -s "$CATEGORY/$PF:$SLOT" -b "$WORKDIR" -d "$sources_dir" \
		-l "$WORKDIR/sources.part" "$elf")
	cat "$WORKDIR/sources.part" >> "$WORKDIR/sources.list"
	"$objcopy" --only-keep-debug ${compress:+--compress-debug-sections} "$elf" "$dst"
	chmod a-x,o-w "$dst"
	mkdir -p "$image/usr/lib/debug/.build-id/${buildid:0:2}"
	ln -s "../../${dst#"$image"/usr/lib/debug/}" "$image/usr/lib/debug/.build-id/${buildid:0:2}/${buildid:2}.debug"
	ln -s "../../../../../$rel" "$image/usr/lib/debug/.build-id/${buildid:0:2}/${buildid:2}"
	"$strip" --strip-unneeded "$elf"
	"$objcopy" --add-gnu-debuglink="$dst" "$elf"
done
# installsources: copy what debugedit listed (relative to WORKDIR), as estrip's rsync.
(
	cd "$WORKDIR"
	tr '\0' '\n' < sources.list | grep -v -e '/<[^/>]*>$' -e '/$' | LC_ALL=C sort -u |
		while IFS= read -r src; do
			[[ -f $src ]] && install -D -m 0644 "$src" "$image$sources_dir/$src"
		done
)
