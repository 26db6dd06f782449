#!/bin/bash
# Install the Debian packages listed in $1 that are not installed yet, and the
# system user the lab and deployments use for mail files. Idempotent and quick
# when everything is already there.
set -euo pipefail
list=${1:-deploy/apt-packages.txt}
mapfile -t pkgs < <(grep -v '^\s*#' "$list" | grep -v '^\s*$')
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "apt: installing ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    export DEBIAN_FRONTEND=noninteractive
    # Postfix must not ask questions or configure the host's own instance.
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    # slapd (LDAP inventory tests) must not configure or start a system directory: tests run their own.
    echo "slapd slapd/no_configuration boolean true" | $SUDO debconf-set-selections
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The mail files' owner (Dovecot's mail_uid/mail_gid in the fragments and the lab).
if ! getent passwd vmail >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO groupadd --system vmail
    $SUDO useradd --system --gid vmail --home-dir /var/vmail --no-create-home --shell /usr/sbin/nologin vmail
fi
