#!/usr/bin/env bash
# CI step: the Prometheus alerting rules parse (`promtool check rules`) and behave as their
# unit tests say (`promtool test rules`). Installs Debian's prometheus package (which ships
# promtool) when promtool is missing; needs root for that, as CI has.
set -euo pipefail
cd "$(dirname "$0")/prometheus"

if ! command -v promtool >/dev/null 2>&1; then
  echo "== installing promtool (Debian package prometheus)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: promtool only, no running Prometheus server pulled in.
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package's postinst may start a Prometheus server where an init system runs;
  # CI wants only the binary. Stopping what is not running is harmless.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl stop prometheus >/dev/null 2>&1 || true
  fi
fi

echo "== promtool $(promtool --version 2>&1 | head -n1)"
echo "== promtool check rules"
promtool check rules alerts.yml
echo "== promtool test rules"
promtool test rules alerts_test.yml
