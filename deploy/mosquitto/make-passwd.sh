#!/bin/sh
# Writes mosquitto's password file from environment variables, so no password is committed.
#   MQTT_CITYFLUX_PASSWORD   account "cityflux" (required)
#   MQTT_OPERATOR_PASSWORD   account "operator" (optional)
#   MQTT_SIMULATOR_PASSWORD  account "simulator" (optional; demo deployments)
#   MQTT_DEVICES_FILE        optional file of "device_id:password" lines, one per device
#                            (skipped if the file does not exist)
# Usage: make-passwd.sh /path/to/passwd   (needs mosquitto_passwd, from mosquitto)
set -eu
out="${1:?usage: make-passwd.sh PASSWORD_FILE}"
: "${MQTT_CITYFLUX_PASSWORD:?set MQTT_CITYFLUX_PASSWORD}"
tmp="$out.tmp"
rm -f "$tmp"
touch "$tmp"
chmod 0600 "$tmp"
mosquitto_passwd -b "$tmp" cityflux "$MQTT_CITYFLUX_PASSWORD"
if [ -n "${MQTT_OPERATOR_PASSWORD:-}" ]; then
  mosquitto_passwd -b "$tmp" operator "$MQTT_OPERATOR_PASSWORD"
fi
if [ -n "${MQTT_SIMULATOR_PASSWORD:-}" ]; then
  mosquitto_passwd -b "$tmp" simulator "$MQTT_SIMULATOR_PASSWORD"
fi
if [ -n "${MQTT_DEVICES_FILE:-}" ] && [ -f "$MQTT_DEVICES_FILE" ]; then
  while IFS=: read -r device password || [ -n "$device" ]; do
    case "$device" in
      ""|"#"*) continue ;;
      # a device line must not replace a role's password
      cityflux|operator|simulator)
        echo "make-passwd: $MQTT_DEVICES_FILE: $device is a role, not a device" >&2
        rm -f "$tmp"
        exit 1 ;;
    esac
    mosquitto_passwd -b "$tmp" "$device" "$password"
  done < "$MQTT_DEVICES_FILE"
fi
# the broker reads it as user "mosquitto" (its image, the Debian package); nobody else may
if id mosquitto >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  chown mosquitto:mosquitto "$tmp"
fi
mv "$tmp" "$out"
echo "make-passwd: wrote $(wc -l < "$out") accounts to $out"
