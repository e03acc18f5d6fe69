#!/bin/sh
# The certificate nginx serves, prepared once before nginx starts (compose's one-shot `tls`
# service; the nginx image has no openssl, the postgres one has).
#
#   tls-setup.sh PROVIDED OUT [HTTPS_PORT]
#
# PROVIDED is the operator's folder: cert.pem (the server certificate followed by its chain)
# and key.pem (its private key, unencrypted). When both are there, they are checked (the key is
# the certificate's) and copied to OUT. When neither is, a self-signed certificate for local
# use (localhost, tandem, 127.0.0.1, ::1; EC P-256, 30 days) is generated in OUT, or the one
# generated before is kept while it has more than a day left, and a WARNING says so on every
# start: no browser or client trusts it. One of the two alone is an error. OUT also gets
# https-port.conf: the port the redirect from plain HTTP names (HTTPS_PORT, default 443).
set -eu

provided=$1
out=$2
port=${3:-443}
# Marks a certificate this script made, so a later start still warns about it.
marker="Tandem local certificate"

umask 077
mkdir -p "$out"

if [ -e "$provided/cert.pem" ] || [ -e "$provided/key.pem" ]; then
    for file in cert.pem key.pem; do
        if [ ! -r "$provided/$file" ]; then
            echo "tls: ERROR: $provided/$file is missing or unreadable (both cert.pem and key.pem are needed)" >&2
            exit 1
        fi
    done
    certificate_key=$(openssl x509 -in "$provided/cert.pem" -noout -pubkey)
    key=$(openssl pkey -in "$provided/key.pem" -pubout)
    if [ "$certificate_key" != "$key" ]; then
        echo "tls: ERROR: $provided/key.pem is not the private key of $provided/cert.pem" >&2
        exit 1
    fi
    cp "$provided/cert.pem" "$out/cert.pem.new"
    cp "$provided/key.pem" "$out/key.pem.new"
    mv "$out/key.pem.new" "$out/key.pem"
    mv "$out/cert.pem.new" "$out/cert.pem"
    echo "tls: serving the provided certificate: $(openssl x509 -in "$out/cert.pem" -noout -subject -enddate | tr '\n' ' ')"
else
    if ! { [ -s "$out/cert.pem" ] && [ -s "$out/key.pem" ] &&
        openssl x509 -in "$out/cert.pem" -noout -subject | grep -q "$marker" &&
        openssl x509 -in "$out/cert.pem" -noout -checkend 86400 >/dev/null; }; then
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
            -subj "/O=$marker (self-signed, not trusted)/CN=localhost" \
            -addext "subjectAltName=DNS:localhost,DNS:tandem,IP:127.0.0.1,IP:::1" \
            -addext "basicConstraints=critical,CA:FALSE" \
            -addext "extendedKeyUsage=serverAuth" \
            -keyout "$out/key.pem.new" -out "$out/cert.pem.new" 2>/dev/null
        mv "$out/key.pem.new" "$out/key.pem"
        mv "$out/cert.pem.new" "$out/cert.pem"
    fi
    echo "tls: WARNING: no certificate in $provided (cert.pem and key.pem): serving a self-signed one generated for local use (localhost, $(openssl x509 -in "$out/cert.pem" -noout -enddate)). No client trusts it; provide your own for anything but a local try (docs/deployment.md, TLS)." >&2
fi

# The port the plain listener's redirect names: none for 443, the default of https.
if [ "$port" = 443 ]; then suffix=""; else suffix=":$port"; fi
printf '# Written by tls-setup.sh: the published HTTPS port.\nmap $host $tandem_https_port {\n    default "%s";\n}\n' "$suffix" >"$out/https-port.conf"
# nginx's master reads these as root and workers never do: owner-only is enough.
chmod 600 "$out/key.pem"
chmod 644 "$out/cert.pem" "$out/https-port.conf"
