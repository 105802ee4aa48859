#!/usr/bin/env bash
# Makes a tpm2-pkcs11 token holding a key generated inside the TPM, for edge-est to use by a
# pkcs11: URI (issuers.*.key, tls.key, upstreams.*.key). Run it on the machine with the TPM
# (/dev/tpmrm0, the kernel's resource manager), as the user that will own the store.
#
#   USER_PIN_FILE=/run/secrets/tpm-pin SO_PIN_FILE=/root/tpm-so-pin \
#     tools/tpm2-token.sh --store /var/lib/edge-est/tpm2-store --token edge-tpm \
#                         --object issuing-ca --algorithm ecc256
#
# PINs come from USER_PIN_FILE / SO_PIN_FILE (first line) or USER_PIN / SO_PIN; they are
# never printed. tpm2_ptool takes them as arguments, so they are visible to other users of
# this machine in the process list while it runs: run it where that does not matter.
# The TPM is /dev/tpmrm0 unless TPM2TOOLS_TCTI / TPM2_PKCS11_TCTI say otherwise (tests/tpm.rs
# runs this script against swtpm behind tpm2-abrmd with TCTI "tabrmd:bus_type=session").
# Needs Debian's tpm2-tools, libtpm2-pkcs11-1 and libtpm2-pkcs11-tools.
set -euo pipefail

usage() {
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
  echo "usage: $0 --store DIR --token LABEL --object LABEL [--algorithm ecc256|ecc384|rsa2048]" >&2
  exit 2
}

store="" token="" object="" algorithm="ecc256"
while [ $# -gt 0 ]; do
  case "$1" in
    --store) store="${2:-}"; shift 2 ;;
    --token) token="${2:-}"; shift 2 ;;
    --object) object="${2:-}"; shift 2 ;;
    --algorithm) algorithm="${2:-}"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$store" ] && [ -n "$token" ] && [ -n "$object" ] || usage
case "$algorithm" in
  ecc256|ecc384|rsa2048) ;;
  *) echo "--algorithm: ecc256, ecc384 or rsa2048 (what edge-est signs with), not $algorithm" >&2; exit 2 ;;
esac
for tool in tpm2_ptool tpm2_getrandom; do
  command -v "$tool" >/dev/null || { echo "$tool missing: apt-get install tpm2-tools libtpm2-pkcs11-tools" >&2; exit 1; }
done

pin() { # NAME: the value of $NAME_FILE's first line, else $NAME
  local file_var="$1_FILE"
  if [ -n "${!file_var:-}" ]; then head -n1 "${!file_var}"; else printf '%s' "${!1:-}"; fi
}
user_pin="$(pin USER_PIN)"
so_pin="$(pin SO_PIN)"
[ -n "$user_pin" ] || { echo "no user PIN: set USER_PIN_FILE (or USER_PIN)" >&2; exit 2; }

export TPM2TOOLS_TCTI="${TPM2TOOLS_TCTI:-device:/dev/tpmrm0}"
export TPM2_PKCS11_TCTI="${TPM2_PKCS11_TCTI:-$TPM2TOOLS_TCTI}"
tpm2_getrandom 4 >/dev/null || { echo "the TPM ($TPM2TOOLS_TCTI) does not answer" >&2; exit 1; }

mkdir -p "$store"
chmod 0700 "$store"
# A primary key in the TPM for the store (once per store).
primary="$(tpm2_ptool listprimaries --path "$store" 2>/dev/null | sed -n 's/^[- ]*id: //p' | head -n1)"
if [ -z "$primary" ]; then
  primary="$(tpm2_ptool init --path "$store" | sed -n 's/^id: //p')"
fi
# The token (once), then the key, generated in the TPM: sensitive, never extractable.
if ! tpm2_ptool listtokens --pid "$primary" --path "$store" 2>/dev/null | grep -qx "  label: $token"; then
  [ -n "$so_pin" ] || { echo "a new token needs an SO PIN: set SO_PIN_FILE (or SO_PIN)" >&2; exit 2; }
  tpm2_ptool addtoken --pid="$primary" --label="$token" --userpin="$user_pin" --sopin="$so_pin" \
    --path "$store" >/dev/null
fi
tpm2_ptool addkey --label="$token" --key-label="$object" --userpin="$user_pin" \
  --algorithm="$algorithm" --path "$store" >/dev/null

echo "token $token: key $object ($algorithm) made in the TPM; store $store"
echo "edge-est key URI: pkcs11:token=$token;object=$object?pin-source=file:<the user PIN file>"
echo "module: /usr/lib/$(uname -m)-linux-gnu/pkcs11/libtpm2_pkcs11.so, with TPM2_PKCS11_STORE=$store"
