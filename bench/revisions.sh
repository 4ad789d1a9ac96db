#!/usr/bin/env bash
# The same benchmarks on two revisions, one after the other in one run (so a refactor can show it
# slowed nothing): bench/train.py, and bench/generate.py against a throw-away `csra up` of each.
#
#     bash bench/revisions.sh BEFORE AFTER          e.g. bash bench/revisions.sh 25344ba HEAD
#     SKIP_TRAIN=1 bash bench/revisions.sh ...       (bench/generate.py only)
#
# Each revision runs from its own git worktree with this checkout's virtualenv. Full outputs go to
# bench/results/<rev>-{train,generate}.txt; the summary lines are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$PWD/.venv/bin/python"
OUT="$PWD/bench/results"
DATA="$(cd .. && pwd)/shared/data/bitext/bitext_customer_support.csv"  # the worktrees live in /tmp
mkdir -p "$OUT"
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

run_rev() {
  local rev=$1 tree data api redis pid
  tree=$(mktemp -d /tmp/csra-rev-XXXX) data=$(mktemp -d /tmp/csra-rev-data-XXXX)
  git worktree add -q --detach "$tree" "$rev"
  if [ -z "${SKIP_TRAIN:-}" ]; then
    (cd "$tree" && "$PY" bench/train.py --no-fp32 --data "$DATA") > "$OUT/$rev-train.txt" 2>&1
  fi
  api=$(free_port) redis=$(free_port)
  cd "$tree"
  CSRA_DATA_DIR="$data" CSRA_API_PORT=$api CSRA_REDIS_PORT=$redis "$PY" -m csra.cli up --no-ui > "$data/up.log" 2>&1 &
  pid=$!
  cd - > /dev/null
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$api/health" | grep -q '"generate":\["' && break
    sleep 1
  done
  (cd "$tree" && CSRA_DATA_DIR="$data" "$PY" bench/generate.py --url "http://127.0.0.1:$api") \
    > "$OUT/$rev-generate.txt" 2>&1 || true
  kill -TERM "$pid"  # csra up stops every part it started
  wait "$pid" || true
  git worktree remove --force "$tree"
  rm -rf "$data"
}

for rev in "$@"; do run_rev "$rev"; done
for rev in "$@"; do
  echo "=== $rev"
  grep -E "^\| (reference|\*\*csra|csra)" "$OUT/$rev-train.txt" || tail -5 "$OUT/$rev-train.txt"
  grep -E "p50|concurrent|identical|x one" "$OUT/$rev-generate.txt" || tail -8 "$OUT/$rev-generate.txt"
done
