#!/bin/sh
# The alertmanager container's entry point: copies CONFIG to RENDERED with the webhook URL
# from ALERTMANAGER_WEBHOOK_URL in place of the placeholder, then runs the rest of the command
# line (Alertmanager reads no environment, and 0.25 has no `url_file`).
#
#   entrypoint.sh CONFIG RENDERED COMMAND [ARGUMENT...]
#
# Plain POSIX sh and awk (the image's busybox has both). The URL is written as a single-quoted
# YAML string, so any character but whitespace is safe in it; Alertmanager itself refuses one
# that is not http(s). The test suite runs this very script (tests/deploy/test_alertmanager*).
set -eu

if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG RENDERED COMMAND [ARGUMENT...]" >&2
    exit 2
fi
config=$1
rendered=$2
shift 2
: "${ALERTMANAGER_WEBHOOK_URL:?set ALERTMANAGER_WEBHOOK_URL (where Alertmanager posts)}"

# Through ENVIRON, not -v: awk would read backslashes in a -v value as escapes.
umask 077
awk '
    BEGIN {
        placeholder = "\047https://tandem-alert-webhook.invalid/\047"
        url = ENVIRON["ALERTMANAGER_WEBHOOK_URL"]
        if (url ~ /[[:space:]]/) {
            print "ALERTMANAGER_WEBHOOK_URL contains whitespace" > "/dev/stderr"
            refused = 1
            exit 1
        }
        gsub(/\047/, "\047\047", url)
        url = "\047" url "\047"
    }
    {
        line = ""
        while ((at = index($0, placeholder)) > 0) {
            line = line substr($0, 1, at - 1) url
            $0 = substr($0, at + length(placeholder))
            found++
        }
        print line $0
    }
    END {
        if (refused) {
            exit 1
        }
        if (!found) {
            print "no webhook placeholder in " FILENAME > "/dev/stderr"
            exit 1
        }
    }
' "$config" >"$rendered"

exec "$@"
