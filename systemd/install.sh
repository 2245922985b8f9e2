#!/bin/sh
# Install chute as a systemd service from this checkout (docs/operations.md, "Install on a
# server"). As root:   sh systemd/install.sh
#
# Each line is one step, safe to run again: run it again after `git pull` to upgrade.
#   1. a virtualenv in /opt/chute with chute and its dependencies (the unit runs
#      /opt/chute/bin/chute; pip never touches the system's Python, PEP 668), and the
#      link /usr/local/bin/chute to it, so `chute` is on everyone's PATH;
#   2. the user chute and the group chute-submit (systemd-sysusers);
#   3. /var/spool/chute and its folders with their owners and modes, and /etc/chute
#      (systemd-tmpfiles);
#   4. /etc/chute/chute.yaml, only if there is none yet (yours is never overwritten);
#   5. the unit, /etc/systemd/system/chute.service (your drop-ins in chute.service.d stay).
# It does not start the service: edit /etc/chute/chute.yaml, then
#   systemctl enable --now chute
#
# ROOT=DIR puts everything under DIR instead of / and leaves systemctl out: the tests
# install into a temporary folder this way.
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
root=${ROOT:-}

python3 -m venv "$root/opt/chute"
"$root/opt/chute/bin/python" -m pip install --quiet "$src"
install -d "$root/usr/local/bin"
ln -sfn /opt/chute/bin/chute "$root/usr/local/bin/chute"
install -D -m 0644 "$src/systemd/chute.sysusers.conf" "$root/etc/sysusers.d/chute.conf"
install -D -m 0644 "$src/systemd/chute.tmpfiles.conf" "$root/etc/tmpfiles.d/chute.conf"
systemd-sysusers ${root:+"--root=$root"} chute.conf
systemd-tmpfiles --create ${root:+"--root=$root"} chute.conf
[ -e "$root/etc/chute/chute.yaml" ] || install -m 0644 "$src/systemd/chute.yaml" "$root/etc/chute/chute.yaml"
install -D -m 0644 "$src/systemd/chute.service" "$root/etc/systemd/system/chute.service"
[ -n "$root" ] || systemctl daemon-reload

echo "installed $root/opt/chute/bin/chute; edit $root/etc/chute/chute.yaml, then: systemctl enable --now chute"
