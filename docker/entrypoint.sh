#!/bin/sh
# The qmp-sdei container's entrypoint.
#
#   (no arguments) | run [ARGS...]   validate $QMP_SDEI_CONFIG, then exec qmp-sdei run with it
#   anything else                    exec qmp-sdei with those arguments (status, raise, version, ...)
#
# Environment: QMP_SDEI_CONFIG (default /etc/qmp-sdei/vm.toml), QMP_SDEI_LOG_FORMAT (json or text,
# default json: one object per line for log collectors), QMP_SDEI_BIN (default qmp-sdei on PATH).
#
# A missing or invalid config exits 2 (qmp-sdei's exit code for configuration errors) with one line
# on stderr, before anything is started, so "docker logs" says what to fix. The sidecar is exec'd:
# it is the container's main process and gets SIGTERM directly.

set -eu

config="${QMP_SDEI_CONFIG:-/etc/qmp-sdei/vm.toml}"
log_format="${QMP_SDEI_LOG_FORMAT:-json}"
qmp_sdei="${QMP_SDEI_BIN:-qmp-sdei}"

if [ "$#" -eq 0 ]; then
    set -- run
fi

if [ "$1" != "run" ]; then
    exec "$qmp_sdei" "$@"
fi
shift

case "$log_format" in
    json | text) ;;
    *)
        echo "qmp-sdei-entrypoint: QMP_SDEI_LOG_FORMAT=$log_format is not json or text" >&2
        exit 2
        ;;
esac

if [ ! -f "$config" ] || [ ! -r "$config" ]; then
    echo "qmp-sdei-entrypoint: no readable config at $config: mount one there, or set QMP_SDEI_CONFIG" >&2
    exit 2
fi

# check-config prints "<file>: ok (...)" or one line naming the bad key, and exits 2 when invalid.
if ! "$qmp_sdei" check-config "$config" >&2; then
    echo "qmp-sdei-entrypoint: $config is not a valid qmp-sdei config; not starting" >&2
    exit 2
fi

exec "$qmp_sdei" run --config "$config" --log-format "$log_format" "$@"
