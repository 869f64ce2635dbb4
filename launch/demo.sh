#!/usr/bin/env bash
# Runs configs through a local Ray head it starts and stops: `launch/demo.sh [a.yaml[,b.yaml…]] [overrides…]`.
# Used by `make demo`; the environment (.venv) and the tiny model + demo data must exist.
set -euo pipefail
cd "$(dirname "$0")/.."

config="${1:-launch/configs/demo.yaml}"
shift || true
gcs_port="${PATHORL_RAY_PORT:-6390}"
dashboard_port="${PATHORL_DASHBOARD_PORT:-8266}"
export PATH="$PWD/.venv/bin:$PATH"
# Keep every Ray process on loopback (without this Ray rewrites 127.0.0.1 to the interface address).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Ray 2.60 turns token authentication on for new clusters; the CLI must be told to send the token.
export RAY_AUTH_MODE=token

if ray job list --address "http://127.0.0.1:$dashboard_port" >/dev/null 2>&1; then
  echo "demo: a Ray cluster already answers on port $dashboard_port (stop it, or set PATHORL_DASHBOARD_PORT" \
       "and PATHORL_RAY_PORT)" >&2
  exit 1
fi
ray start --head --block --num-cpus="${PATHORL_NUM_CPUS:-$(nproc)}" --node-ip-address=127.0.0.1 --port="$gcs_port" \
  --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" --disable-usage-stats >/tmp/pathorl-ray-head.log 2>&1 &
head_pid=$!
# `ray start --block` stops exactly the processes it started when it is signalled (unlike `ray stop`,
# which would also stop any other Ray instance of this user).
trap 'kill "$head_pid" 2>/dev/null; wait "$head_pid" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
for _ in $(seq 120); do
  ray job list --address "http://127.0.0.1:$dashboard_port" >/dev/null 2>&1 && break
  kill -0 "$head_pid" 2>/dev/null || { cat /tmp/pathorl-ray-head.log; echo "demo: Ray head failed to start" >&2; exit 1; }
  sleep 1
done

address="http://127.0.0.1:$dashboard_port"
# Several configs, comma-separated, run in order as one job each (the stages of a pipeline). A config
# that sets sft.train is an SFT stage (launch/sft.py), any other an RL run (launch/rl.py).
IFS=',' read -ra configs <<< "$config"
for config in "${configs[@]}"; do
  entry=$(python -c "import sys; from engine.config import load_config; \
print('launch/sft.py' if load_config(sys.argv[1]).sft.train else 'launch/rl.py')" "$config")
  # The dashboard can answer before its job agent is up ("No available agent to submit job"), so the
  # submission is retried under a fixed id; a retry never starts the job twice.
  job="pathorl-$(date +%Y%m%d-%H%M%S)"
  for _ in $(seq 30); do
    ray job submit --address "$address" --submission-id "$job" --no-wait -- \
      python "$entry" --config "$config" "$@" >/dev/null 2>&1 && break
    ray job status --address "$address" "$job" >/dev/null 2>&1 && break
    sleep 2
  done
  ray job logs --address "$address" --follow "$job"
  status=$(ray job status --address "$address" "$job" 2>&1 || true)
  [[ "$status" == *"Job '$job' succeeded"* ]] || { echo "$status" >&2; echo "demo: job $job did not succeed" >&2; exit 1; }
  python launch/summarize_run.py --config "$config" "$@"
done
