#!/usr/bin/env bash
# The head's first start command in every cluster YAML (head_start_ray_commands), before Ray:
# refuse a placeholder or a missing token, then start the MLflow tracking server on loopback
# and record its address. Usage: prepare-head.sh ARTIFACTS, where MLflow keeps its artifacts
# (s3://bucket/prefix, or a directory on the shared disk).
set -euo pipefail
artifacts=${1:?usage: prepare-head.sh ARTIFACTS (s3://bucket/prefix or a shared directory)}
if [[ $artifacts == *REPLACE_ME* ]]; then
  echo "prepare-head.sh: the cluster YAML still holds the placeholder '$artifacts': set MLflow's artifact store" >&2
  exit 2
fi
# The token `ray up` copied from your machine (file_mounts): Ray's processes and clients
# authenticate with it.
if [[ ! -s ~/.ray/auth_token ]]; then
  echo "prepare-head.sh: no Ray token at ~/.ray/auth_token: run 'ray get-auth-token --generate' where you run 'ray up'" >&2
  exit 2
fi

# The tracking server, unless it already runs (`ray up` on a live cluster). Only the sweep
# driver talks to it, and the driver runs on the head: it listens on loopback alone. Its
# database lives in ~/mlflow; artifacts go to $artifacts through it. MLflow's job runner is
# off: nothing here submits MLflow jobs.
uri=http://127.0.0.1:5000
health() { python -c "import urllib.request as u; u.urlopen('$uri/health', timeout=2)" 2> /dev/null; }
mkdir -p ~/mlflow ~/.clip-sae
if ! health; then
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup mlflow server --host 127.0.0.1 --port 5000 \
    --workers 2 --backend-store-uri "sqlite:///$HOME/mlflow/mlflow.db" \
    --artifacts-destination "$artifacts" > ~/mlflow/server.log 2>&1 < /dev/null &
  for _ in $(seq 120); do health && break; sleep 1; done
  if ! health; then
    echo "prepare-head.sh: mlflow server did not start; ~/mlflow/server.log ends:" >&2
    tail -n 20 ~/mlflow/server.log >&2
    exit 1
  fi
fi
# Sweeps started on the head (`ray job submit`, `ray submit`, `ray exec`) read the server's
# address here when neither sweep.tracking_uri nor MLFLOW_TRACKING_URI is set.
echo "$uri" > ~/.clip-sae/tracking_uri
