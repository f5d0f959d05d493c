#!/bin/sh
# Makes a local certificate authority and the broker's server certificate for the TLS
# listener (port 8883 in mosquitto.conf), with openssl.
#
# Usage: make-certs.sh [DIR] [HOST ...]
#   DIR   where to write (default: the certs/ directory next to this script)
#   HOST  extra names clients use to reach the broker: DNS names or IP addresses, e.g.
#         mqtt.city.example 10.0.0.5 (localhost, 127.0.0.1, ::1 and "mosquitto", the compose
#         service name, are always in the certificate). MQTT_TLS_HOSTS adds more, space-separated.
#
# Writes DIR/ca.crt (give it to devices and operators: mqtt.tls.ca_file), DIR/ca.key (keep it
# secret and offline if you can), DIR/server.crt and DIR/server.key (the broker's).
# The CA is valid for 10 years and is kept when it exists: run the script again to renew the
# server certificate (valid 825 days, the most that common TLS clients accept) or to add a
# host name, and devices keep trusting the same ca.crt.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-$here/certs}"
[ $# -gt 0 ] && shift
umask 077
mkdir -p "$dir"
command -v openssl >/dev/null || { echo "make-certs: openssl is not installed" >&2; exit 1; }

if [ ! -f "$dir/ca.key" ] || [ ! -f "$dir/ca.crt" ]; then
  openssl req -x509 -new -sha256 -days 3650 -nodes \
    -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -subj "/O=cityflux/CN=cityflux local CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  echo "make-certs: new CA $dir/ca.crt (10 years)"
fi

san="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:mosquitto"
for host in "$@" ${MQTT_TLS_HOSTS:-}; do
  case "$host" in
    *[!0-9.]*) case "$host" in *:*) san="$san,IP:$host" ;; *) san="$san,DNS:$host" ;; esac ;;
    *) san="$san,IP:$host" ;;
  esac
done

ext="$dir/server.ext"
cat > "$ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $san
EOF
openssl req -new -sha256 -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
  -keyout "$dir/server.key.tmp" -out "$dir/server.csr" -subj "/O=cityflux/CN=cityflux broker" \
  2>/dev/null
openssl x509 -req -sha256 -days 825 -in "$dir/server.csr" -CA "$dir/ca.crt" \
  -CAkey "$dir/ca.key" -CAcreateserial -CAserial "$dir/ca.srl" -extfile "$ext" \
  -out "$dir/server.crt.tmp" 2>/dev/null
mv "$dir/server.key.tmp" "$dir/server.key"
mv "$dir/server.crt.tmp" "$dir/server.crt"
rm -f "$dir/server.csr" "$ext"
# certificates are public; the keys stay 0600
chmod 0644 "$dir/ca.crt" "$dir/server.crt"
echo "make-certs: server certificate $dir/server.crt for $san (825 days)"
