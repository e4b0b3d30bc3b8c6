#!/usr/bin/env bash
# The head's services, run by `ray up` (head_start_ray_commands) in every cluster YAML, so the
# clouds cannot drift apart: Ray with token authentication, then the MLflow tracking server on
# loopback. Usage: start-head.sh ARTIFACTS, where ARTIFACTS is where MLflow stores artifacts
# (s3://bucket/prefix, or a directory on the shared disk).
#
# Ports are Ray's and MLflow's defaults. A machine that runs other Ray instances (the test
# suite's) moves them with RAY_HEAD_PORT_ARGS (extra `ray start` flags) and MLFLOW_PORT.
set -euo pipefail
artifacts=${1:?usage: start-head.sh ARTIFACTS (s3://bucket/prefix or a shared directory)}
if [[ $artifacts == *REPLACE_ME* ]]; then
  echo "start-head.sh: the cluster YAML still holds the placeholder '$artifacts': set MLflow's artifact store" >&2
  exit 2
fi
# The token `ray up` copied from your machine (file_mounts): every Ray process on this node,
# and every client, must present it.
if [[ ! -s ~/.ray/auth_token ]]; then
  echo "start-head.sh: no Ray token at ~/.ray/auth_token: run 'ray get-auth-token --generate' where you run 'ray up'" >&2
  exit 2
fi
export RAY_AUTH_MODE=token
# Autoscaler v2 honours node type priorities and backs off a type whose launch failed
# (spot capacity), so on-demand workers take over.
export RAY_enable_autoscaler_v2=1
ulimit -n 65536 || true
ray stop
# Dashboard and job API on loopback: clients come through `ray dashboard` (an SSH tunnel).
# shellcheck disable=SC2086  # RAY_HEAD_PORT_ARGS is a list of flags
ray start --head --port=6379 --object-manager-port=8076 --dashboard-host=127.0.0.1 \
  --autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats ${RAY_HEAD_PORT_ARGS:-}

# The tracking server, unless it already runs (`ray up` on a live cluster). Only the sweep
# driver talks to it, and the driver runs on this node: it listens on loopback alone. Its
# database lives in ~/mlflow; artifacts go to $artifacts through it.
port=${MLFLOW_PORT:-5000}
uri=http://127.0.0.1:$port
mkdir -p ~/mlflow ~/.clip-sae
health() { python -c "import urllib.request as u; u.urlopen('$uri/health', timeout=2)" 2>/dev/null; }
if ! health; then
  nohup mlflow server --host 127.0.0.1 --port "$port" --workers 2 \
    --backend-store-uri "sqlite:///$HOME/mlflow/mlflow.db" --artifacts-destination "$artifacts" \
    > ~/mlflow/server.log 2>&1 < /dev/null &
  for _ in $(seq 120); do health && break; sleep 1; done
  health || { echo "start-head.sh: mlflow server did not start; see ~/mlflow/server.log:" >&2; tail -n 20 ~/mlflow/server.log >&2; exit 1; }
fi
# Sweeps started on this node (`ray job submit`, `ray submit`, `ray exec`) read the server's
# address here when neither sweep.tracking_uri nor MLFLOW_TRACKING_URI is set.
echo "$uri" > ~/.clip-sae/tracking_uri
