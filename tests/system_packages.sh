#!/usr/bin/env bash
# System packages some integration tests use: PostgreSQL (distributed tuning) and Chromium (the
# service's docs page). Installed with apt-get when missing and we are root; otherwise the tests
# that need them skip with a reason. Never fails the test run.
set -u
need=()
command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system_packages: ${need[*]} missing and cannot apt-get here; the tests needing them will skip" >&2
  exit 0
fi
echo "system_packages: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
{ apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } >/tmp/cxr-apt.log 2>&1 \
  || echo "system_packages: apt-get failed (see /tmp/cxr-apt.log); the tests needing ${need[*]} will skip" >&2
exit 0
