#!/usr/bin/env bash
# A worker's Ray, run by `ray up` and the autoscaler (worker_start_ray_commands) in every
# cluster YAML: it joins the head at $RAY_HEAD_IP with the token `ray up` copied here.
set -euo pipefail
if [[ ! -s ~/.ray/auth_token ]]; then
  echo "start-worker.sh: no Ray token at ~/.ray/auth_token (file_mounts)" >&2
  exit 2
fi
export RAY_AUTH_MODE=token
ulimit -n 65536 || true
ray stop
ray start --address="${RAY_HEAD_IP:?set by Ray}:6379" --object-manager-port=8076 --disable-usage-stats
