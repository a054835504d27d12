#!/usr/bin/env bash
# RunPod-style worker start: start ComfyUI (with comfyui-memkit in its custom_nodes), wait until
# GET /memkit/ready answers 200 (preload and warm-up done), then run the handler given as arguments:
#
#   COMFYUI_DIR=/comfyui MEMKIT_PRELOAD_CONFIG=/workspace/preload_config.json \
#       ./start.sh python -u handler.py
#
# What the platform does on its side (pulling the image, routing jobs to the handler, its own
# health checks) is not assumed here; the handler only starts once ComfyUI can take a job.
set -euo pipefail

COMFYUI_DIR=${COMFYUI_DIR:-/comfyui}
COMFY_PORT=${COMFY_PORT:-8188}
COMFY_ARGS=${COMFY_ARGS:-}
PYTHON=${PYTHON:-python3}
READY_TIMEOUT=${READY_TIMEOUT:-900}
COMFY_PIDFILE=${COMFY_PIDFILE:-/tmp/comfyui.pid}
COMFY_LOG=${COMFY_LOG:-/tmp/comfyui.log}
READY_URL="http://127.0.0.1:${COMFY_PORT}/memkit/ready"

if [ "$#" -eq 0 ]; then
    echo "usage: $0 HANDLER_COMMAND [ARGS...]" >&2
    exit 2
fi

# shellcheck disable=SC2086  # COMFY_ARGS is a list of flags
"$PYTHON" "$COMFYUI_DIR/main.py" --listen 127.0.0.1 --port "$COMFY_PORT" $COMFY_ARGS >"$COMFY_LOG" 2>&1 &
comfy_pid=$!
echo "$comfy_pid" >"$COMFY_PIDFILE"
echo "ComfyUI (pid $comfy_pid) logs to $COMFY_LOG" >&2

answer=$(mktemp)
deadline=$((SECONDS + READY_TIMEOUT))
while true; do
    code=$(curl -s -o "$answer" -w '%{http_code}' "$READY_URL" || true)
    if [ "$code" = 200 ]; then
        break
    fi
    if ! kill -0 "$comfy_pid" 2>/dev/null; then
        echo "ComfyUI exited before it was ready; the end of $COMFY_LOG:" >&2
        tail -n 40 "$COMFY_LOG" >&2
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "ComfyUI not ready after ${READY_TIMEOUT} s: $(cat "$answer")" >&2
        exit 1
    fi
    sleep 0.5
done
echo "memkit ready: $(cat "$answer")"
rm -f "$answer"
exec "$@"
