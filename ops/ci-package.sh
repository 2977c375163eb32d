#!/usr/bin/env bash
# CI step: build the Debian package with cargo-deb and show what it installs. Fails when the
# package lacks a binary of Cargo.toml, the unit, the example configuration, or the
# maintainer script that creates the service user.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
  echo "== installing cargo-deb"
  # --locked: the dependency versions cargo-deb was released with.
  cargo install cargo-deb --locked
fi
echo "== $(cargo deb --version)"

echo "== cargo deb (release build)"
# cargo deb prints the paths of the packages it wrote (the .deb, and the -dbgsym .ddeb with
# the debug symbols).
deb="$(cargo deb | grep '\.deb$' | tail -n 1)"
if [ ! -f "$deb" ]; then
  echo "cargo deb did not report a package file (got: $deb)" >&2
  exit 1
fi
echo "== package: $deb"
dpkg-deb --info "$deb"
echo "== contents"
contents="$(dpkg-deb --contents "$deb")"
echo "$contents"

echo "== checks"
fail=0
need() {
  if echo "$contents" | grep -Eq "$1"; then
    echo "ok: $2"
  else
    echo "MISSING: $2" >&2
    fail=1
  fi
}
# Every [[bin]] of Cargo.toml (tools added later are packaged by "$auto" and checked here).
for bin in $(sed -n '/^\[\[bin\]\]/,/^name/ s/^name *= *"\(.*\)"/\1/p' Cargo.toml); do
  need " \./usr/bin/$bin\$" "/usr/bin/$bin"
done
need ' \./(usr/)?lib/systemd/system/flux-outbox\.service$' "systemd unit"
need ' \./etc/flux-outbox/flux-outbox\.toml$' "example configuration in /etc/flux-outbox"
need ' \./usr/share/doc/flux-outbox/RUNBOOK\.md$' "runbook"

control="$(mktemp -d)"
trap 'rm -rf "$control"' EXIT
dpkg-deb --control "$deb" "$control"
if grep -q '^/etc/flux-outbox/flux-outbox.toml$' "$control/conffiles" 2>/dev/null; then
  echo "ok: configuration is a conffile"
else
  echo "MISSING: /etc/flux-outbox/flux-outbox.toml in conffiles" >&2
  fail=1
fi
if grep -q 'useradd --system' "$control/postinst" && grep -q 'deb-systemd' "$control/postinst"; then
  echo "ok: postinst creates the user and enables the unit"
else
  echo "MISSING: user creation or unit enabling in postinst" >&2
  fail=1
fi
sh -n "$control/postinst"
exit "$fail"
