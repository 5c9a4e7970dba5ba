#!/usr/bin/env bash
# A local Ray head with token authentication, for `ray job submit` on this machine.
#
#   cluster/local.sh start [extra `ray start` args, e.g. --num-cpus 4]
#   eval "$(cluster/local.sh env)"     # RAY_ADDRESS + token for this shell
#   ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/tiny_gpt2.yaml
#   cluster/local.sh stop
#
# Environment knobs: PYTHON (interpreter whose `ray` and `python` the head and the jobs use),
# RAY_DASHBOARD_PORT (8265), RAY_GCS_PORT (6379), RAYTRAINER_TOKEN_FILE (where the token is kept).
set -euo pipefail

DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
GCS_PORT="${RAY_GCS_PORT:-6379}"
TOKEN_FILE="${RAYTRAINER_TOKEN_FILE:-${XDG_STATE_HOME:-$HOME/.local/state}/raytrainer/ray_auth_token}"

# The head's PATH is the PATH of every job entrypoint: put the chosen interpreter's bin dir
# first, so `ray` and the job's `python` are the ones that have raytrainer installed.
PYTHON="${PYTHON:-python3}"
PYTHON_BIN_DIR="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")"
export PATH="$PYTHON_BIN_DIR:$PATH"

token() {
    # Reuse RAY_AUTH_TOKEN or the saved token; else make one like Ray does (256 random bits).
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        printf '%s' "$RAY_AUTH_TOKEN"
    elif [[ -s "$TOKEN_FILE" ]]; then
        cat "$TOKEN_FILE"
    else
        mkdir -p "$(dirname "$TOKEN_FILE")"
        (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$TOKEN_FILE")
        cat "$TOKEN_FILE"
    fi
}

print_env() {
    echo "export RAY_AUTH_MODE=token"
    echo "export RAY_AUTH_TOKEN=$(token)"
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
}

case "${1:-}" in
    start)
        shift
        export RAY_AUTH_MODE=token
        RAY_AUTH_TOKEN="$(token)"
        export RAY_AUTH_TOKEN
        ray start --head --port="$GCS_PORT" \
            --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
            --disable-usage-stats "$@"
        cat <<MSG

Ray head is up (token auth on). In the shell that submits jobs:

    eval "\$($0 env)"     # or:
$(print_env | sed 's/^/    /')

Submit the tiny example job from the repository root:

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/tiny_gpt2.yaml

Stop the head with:  $0 stop
MSG
        ;;
    env)
        print_env
        ;;
    stop)
        ray stop
        ;;
    status)
        RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(token)" ray status --address "127.0.0.1:$GCS_PORT"
        ;;
    *)
        echo "usage: $0 {start [ray start args]|env|stop|status}" >&2
        exit 2
        ;;
esac
