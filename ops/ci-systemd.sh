#!/usr/bin/env bash
# CI step: the systemd unit passes `systemd-analyze verify` without a single warning, and
# `systemd-analyze security --offline=true` rates it at the exposure level RUNBOOK.md records.
# Neither needs a running systemd (CI containers have none). Installs Debian's systemd package
# (which ships systemd-analyze) when it is missing; needs root for that, as CI has.
set -euo pipefail
cd "$(dirname "$0")"

unit=systemd/flux-outbox.service
runbook=RUNBOOK.md

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "== installing systemd-analyze (Debian package systemd)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
echo "== $(systemd-analyze --version | head -n1)"

# verify loads the unit with its dependencies (targets) and checks that ExecStart= is
# executable, so it runs against a scratch root: the distribution's unit directory, the unit
# where the package installs it, and a stand-in for /usr/bin/flux-outbox (the binary itself is
# not what is verified here).
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
units=/usr/lib/systemd/system
[ -d "$units" ] || units=/lib/systemd/system
cp -a "$units" "$root/usr/lib/systemd/"
printf '#!/bin/sh\nexit 0\n' >"$root/usr/bin/flux-outbox"
chmod 755 "$root/usr/bin/flux-outbox"

# systemd-analyze verify exits 0 on unknown keys and unparsable values (it only warns), so
# any output at all is a failure.
verify() {
  cp "$1" "$root/etc/systemd/system/flux-outbox.service"
  local out rc=0
  out=$(systemd-analyze verify --man=no --root="$root" flux-outbox.service 2>&1) || rc=$?
  printf '%s' "$out"
  [ "$rc" -eq 0 ] && [ -z "$out" ]
}

echo "== systemd-analyze verify $unit"
if ! verify "$unit"; then
  echo
  echo "FAIL: systemd-analyze verify complained about $unit" >&2
  exit 1
fi

# The check must be able to fail: a misspelt directive has to be reported.
broken="$root/broken.service"
sed 's/^WatchdogSec=/WatchdgSec=/' "$unit" >"$broken"
if verify "$broken" >/dev/null; then
  echo "FAIL: systemd-analyze verify did not notice a misspelt WatchdogSec=" >&2
  exit 1
fi

echo "== systemd-analyze security --offline=true $unit"
report=$(systemd-analyze security --offline=true --no-pager "$unit" 2>&1)
line=$(printf '%s\n' "$report" | grep 'Overall exposure level' || true)
echo "$line"
# "→ Overall exposure level for flux-outbox.service: 1.1 OK 🙂" -> "1.1 OK"
level=$(printf '%s\n' "$line" | sed -n 's/.*flux-outbox.service: \([0-9.]* [A-Z]*\).*/\1/p')
if [ -z "$level" ]; then
  printf '%s\n' "$report" >&2
  echo "FAIL: no exposure level in the systemd-analyze security report" >&2
  exit 1
fi
if ! grep -qF "**$level**" "$runbook"; then
  echo "FAIL: RUNBOOK.md does not record the exposure level $level (update its Security section)" >&2
  exit 1
fi
# And it must stay low: 2.0 or better ("OK" band).
systemd-analyze security --offline=true --threshold=20 --no-pager "$unit" >/dev/null
echo "== unit checks passed (exposure $level, recorded in RUNBOOK.md)"
