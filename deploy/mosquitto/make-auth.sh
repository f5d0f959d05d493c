#!/bin/sh
# Writes every file mosquitto.conf reads from /mosquitto/auth/ into DIR, readable by the broker
# only (user "mosquitto" when run as root, as compose's mqtt-credentials service does):
#   DIR/passwd                       make-passwd.sh: MQTT_*_PASSWORD, MQTT_DEVICES_FILE
#   DIR/acl                          the roles (MQTT_ACL_ROLES, default: acl next to this
#                                    script), then the device accounts from MQTT_DEVICES_ACL
#                                    (`cityflux devices acl CITY_MAP`; skipped if absent)
#   DIR/server.crt, DIR/server.key   the TLS listener's, from MQTT_CERTS_DIR (default: certs/
#                                    next to this script; make-certs.sh writes them): required
# Usage: make-auth.sh DIR   (needs mosquitto_passwd, from mosquitto)
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: make-auth.sh DIR}"
certs="${MQTT_CERTS_DIR:-$here/certs}"
roles="${MQTT_ACL_ROLES:-$here/acl}"
for file in server.crt server.key; do
  if [ ! -f "$certs/$file" ]; then
    echo "make-auth: no $certs/$file: run deploy/mosquitto/make-certs.sh first (docs/deploy.md)" >&2
    exit 1
  fi
done
umask 077
mkdir -p "$out"
sh "$here/make-passwd.sh" "$out/passwd"

cat "$roles" > "$out/acl.tmp"
devices=0
if [ -n "${MQTT_DEVICES_ACL:-}" ] && [ -f "$MQTT_DEVICES_ACL" ]; then
  # a device section named like a role would add to that role's rights, and a pattern may
  # only ever grant a device its own id (%u, no wildcard): refuse anything else
  if grep -Eq '^[[:space:]]*user[[:space:]]+(cityflux|operator|simulator)[[:space:]]*$' \
      "$MQTT_DEVICES_ACL" || grep -E '^[[:space:]]*pattern[[:space:]]' "$MQTT_DEVICES_ACL" \
      | grep -Evq '^pattern write [^+#%[:space:]]+/%u(/status)?$'; then
    echo "make-auth: $MQTT_DEVICES_ACL grants a role account or a wide pattern; regenerate it with cityflux devices acl" >&2
    rm -f "$out/acl.tmp"
    exit 1
  fi
  { echo; echo "# device accounts from $MQTT_DEVICES_ACL"; cat "$MQTT_DEVICES_ACL"; } >> "$out/acl.tmp"
  devices=$(grep -Ec '^[[:space:]]*(user|pattern)[[:space:]]' "$MQTT_DEVICES_ACL" || true)
fi
cp "$certs/server.crt" "$out/server.crt.tmp"
cp "$certs/server.key" "$out/server.key.tmp"
chmod 0600 "$out/acl.tmp" "$out/server.crt.tmp" "$out/server.key.tmp"
if id mosquitto >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  chown mosquitto:mosquitto "$out/acl.tmp" "$out/server.crt.tmp" "$out/server.key.tmp"
fi
mv "$out/acl.tmp" "$out/acl"
mv "$out/server.crt.tmp" "$out/server.crt"
mv "$out/server.key.tmp" "$out/server.key"
echo "make-auth: wrote $out/acl (roles + $devices device sections and patterns) and the TLS certificate"
