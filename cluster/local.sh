#!/usr/bin/env bash
# A local Ray head with token authentication, for `ray job submit` on this machine.
#
#   cluster/local.sh start [extra `ray start` args, e.g. --num-cpus 4]
#   eval "$(cluster/local.sh env)"     # RAY_ADDRESS + token for this shell
#   ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/tiny_gpt2.yaml
#   cluster/local.sh stop               # stops this head only (never a bare `ray stop`)
#
# Environment knobs: PYTHON (interpreter whose `ray` and `python` the head and the jobs use),
# RAY_DASHBOARD_PORT (8265), RAY_GCS_PORT (6379), RAYTRAINER_NODE_IP (127.0.0.1: --node-ip-address),
# RAYTRAINER_TOKEN_FILE (where the token is kept),
# RAYTRAINER_RAY_TMP (the head's Ray temp dir, logs included; default /tmp/raytrainer-ray-<GCS port>).
#
# `start` gives the head its own Ray temp dir and records it (state file next to the token); `stop`
# ends exactly the processes of that head's session (found by their session folder, signalled by
# pid), so another Ray on this machine (a notebook's ray.init(), a test run) is left alone.
# The token is printed only by `env` (meant for eval); `start` and `stop` never print it.
set -euo pipefail

DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
GCS_PORT="${RAY_GCS_PORT:-6379}"
# the address Ray records for this node and that drivers and workers connect to; pinned, else Ray takes
# the address of the default route's interface. The dashboard binds 127.0.0.1 whatever this is.
NODE_IP="${RAYTRAINER_NODE_IP:-127.0.0.1}"
TOKEN_FILE="${RAYTRAINER_TOKEN_FILE:-${XDG_STATE_HOME:-$HOME/.local/state}/raytrainer/ray_auth_token}"
STATE_FILE="$(dirname "$TOKEN_FILE")/head-$GCS_PORT.env"
# short: Ray's unix sockets live under it and a socket path must stay under ~107 characters
RAY_TMP="${RAYTRAINER_RAY_TMP:-/tmp/raytrainer-ray-$GCS_PORT}"

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
    # %q: a token with spaces, quotes, '&' or '$' survives `eval`
    printf 'export RAY_AUTH_TOKEN=%q\n' "$(token)"
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"  # the dashboard binds 127.0.0.1
}

# stdin -> stdout with every occurrence of the token replaced by <token>; a literal match (bash's
# quoted pattern), so '/', '&', '.', '*' or '\' in a token cannot break or widen it as in sed
mask_token() {
    local secret line
    secret="$(token)"
    while IFS= read -r line || [[ -n "$line" ]]; do
        printf '%s\n' "${line//"$secret"/<token>}"
    done
}

# the pids of every process of the recorded head's session (its session folder is in their command lines)
session_pids() {
    "$PYTHON" - "$1" <<'PY'
import sys, psutil
session = sys.argv[1].rstrip("/")
for p in psutil.process_iter(["pid", "cmdline"]):
    try:
        line = " ".join(p.info["cmdline"] or []) + " "
    except (psutil.Error, TypeError):
        continue
    if session + "/" in line or session + " " in line:
        print(p.info["pid"])
PY
}

stop_head() {
    if [[ ! -s "$STATE_FILE" ]]; then
        echo "no head started by $0 on GCS port $GCS_PORT (no $STATE_FILE); nothing stopped" >&2
        return 0
    fi
    # shellcheck disable=SC1090
    SESSION_DIR="$(sed -n 's/^SESSION_DIR=//p' "$STATE_FILE")"
    if [[ -z "$SESSION_DIR" ]]; then
        echo "$STATE_FILE names no session; nothing stopped" >&2
        return 1
    fi
    mapfile -t pids < <(session_pids "$SESSION_DIR")
    if [[ ${#pids[@]} -eq 0 ]]; then
        echo "the head of $SESSION_DIR is not running"
        rm -f "$STATE_FILE"
        return 0
    fi
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 50); do  # up to 10 s for a clean exit
        mapfile -t left < <(session_pids "$SESSION_DIR")
        [[ ${#left[@]} -eq 0 ]] && break
        sleep 0.2
    done
    mapfile -t left < <(session_pids "$SESSION_DIR")
    if [[ ${#left[@]} -gt 0 ]]; then
        kill -KILL "${left[@]}" 2>/dev/null || true
    fi
    rm -f "$STATE_FILE"
    echo "stopped the Ray head of $SESSION_DIR (${#pids[@]} processes)"
}

case "${1:-}" in
    start)
        shift
        if [[ -s "$STATE_FILE" ]]; then
            SESSION_DIR="$(sed -n 's/^SESSION_DIR=//p' "$STATE_FILE")"
            if [[ -n "$(session_pids "$SESSION_DIR")" ]]; then
                echo "a head started by $0 is already running on GCS port $GCS_PORT ($SESSION_DIR); $0 stop first" >&2
                exit 1
            fi
        fi
        export RAY_AUTH_MODE=token
        RAY_AUTH_TOKEN="$(token)"
        export RAY_AUTH_TOKEN
        # Ray Train's PlacementGroupCleaner (in every job on this head) asks the state API with no address:
        # with another Ray on this machine (a notebook's ray.init()) "auto" finds two clusters and it dies
        # with "Found multiple active Ray instances". The head's processes inherit this and ask their own.
        export RAY_API_SERVER_ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
        mkdir -p "$RAY_TMP" "$(dirname "$STATE_FILE")"
        # the token never reaches the terminal, even if Ray echoes it
        ray start --head --port="$GCS_PORT" --temp-dir="$RAY_TMP" --node-ip-address "$NODE_IP" \
            --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
            --disable-usage-stats "$@" 2>&1 | mask_token
        SESSION_DIR="$(readlink -f "$RAY_TMP/session_latest")"
        printf 'SESSION_DIR=%s\nGCS_PORT=%s\nDASHBOARD_PORT=%s\nRAY_TMP=%s\n' \
            "$SESSION_DIR" "$GCS_PORT" "$DASHBOARD_PORT" "$RAY_TMP" > "$STATE_FILE"
        cat <<MSG

Ray head is up (token auth on; session $SESSION_DIR). In the shell that submits jobs:

    eval "\$($0 env)"     # sets RAY_AUTH_MODE, RAY_AUTH_TOKEN (kept in $TOKEN_FILE) and
                           # RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT

Submit the tiny example job from the repository root:

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/tiny_gpt2.yaml

Stop the head with:  $0 stop
MSG
        ;;
    env)
        print_env
        ;;
    mask)  # what `start` does to Ray's output (tests/test_cluster_configs.py)
        mask_token
        ;;
    stop)
        stop_head
        ;;
    status)
        RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(token)" ray status --address "$NODE_IP:$GCS_PORT"
        ;;
    *)
        echo "usage: $0 {start [ray start args]|env|stop|status|mask}" >&2
        exit 2
        ;;
esac
