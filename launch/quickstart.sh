#!/usr/bin/env bash
# The first hour in one command: tokenize Tiny Shakespeare, pretrain a small 4-head teacher, distill it
# into a one-head student, evaluate both (compounding errors), then print a summary.
#
#   bash launch/quickstart.sh [OUT]        # OUT defaults to runs/quickstart
#
# It installs nothing (first: pip install -e .). It needs about 10 minutes on a 2-core laptop CPU in
# fp32 (README, "Quickstart"), less where bf16 is fast or on a GPU. Character-level, so the samples
# read like Shakespeare after a few minutes. Run it again and every finished stage is skipped (its
# result.json exists) and an interrupted one resumes: a finished quickstart reruns in seconds.
# Offline: export TIKTOKEN_CACHE_DIR=... TINYSHAKESPEARE_PATH=... first (README, "Offline use").
#
# Writes OUT/teacher, OUT/student, OUT/evaluate (run folders), OUT/summary.json, and
# runs/latest/<stage> links to the newest run of each stage.
set -euo pipefail

# OUT is taken relative to where the command was typed; the recipes run from the project's root.
out="${1:-}"
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "$out" ]; then
  out="runs/quickstart"  # printed as typed: the recipes run from the root
elif [ "${out#/}" = "$out" ]; then
  out="$PWD/$out"
fi
cd "$root"

if ! python -c "import pipeline, accelerate, tiktoken" 2>/dev/null; then
  echo "error: the project is not installed in this Python ($(command -v python || echo 'no python on PATH')):" \
    "run pip install -e . first (README, 'Quickstart')" >&2
  exit 2
fi

export PYTHONUNBUFFERED=1

seconds=()
skipped=()

# stage N NAME RUN_FOLDER COMMAND...: run one stage unless its run folder already holds result.json.
stage() {
  local n=$1 name=$2 dir=$3
  shift 3
  if [ -f "$dir/result.json" ]; then
    echo "[$n/5] $name: done already ($dir), skipped"
    seconds+=("$name=0")
    skipped+=("$name")
    return
  fi
  echo
  echo "[$n/5] $name"
  local t0=$SECONDS
  "$@"
  seconds+=("$name=$((SECONDS - t0))")
  echo "[$n/5] $name: done in $((SECONDS - t0)) s"
}

# Continue an interrupted training run from its newest state; start a fresh one otherwise.
resume() { [ -d "$1/states" ] && echo "--train.resume auto"; return 0; }

echo "quickstart: tokenize -> pretrain a 4-head teacher -> distill a 1-head student -> evaluate -> summary"
echo "run folders under $out"

echo
echo "[1/5] tokenize: Tiny Shakespeare, one token per character"
t0=$SECONDS
python recipes/tokenize.py --preset quick
seconds+=("tokenize=$((SECONDS - t0))")

echo "  (the teacher: 4 layers x 4 heads, d_model 128, 1,200 steps of 12 x 64 characters; a progress bar with the time left follows)"
# shellcheck disable=SC2046
stage 2 pretrain "$out/teacher" \
  python recipes/pretrain.py --preset quick --out "$out/teacher" $(resume "$out/teacher")

echo "  (the student: the teacher's shape with one head, started from the teacher's most important head per layer)"
# shellcheck disable=SC2046
stage 3 distill "$out/student" \
  python recipes/distill.py --preset quick --teacher "$out/teacher/best" --out "$out/student" $(resume "$out/student")

stage 4 evaluate "$out/evaluate" \
  python recipes/evaluate.py --models "$out/teacher/best" "$out/student/best" --names teacher student \
  --preset quick --prompts 100 --prompt-tokens 32 --new-tokens 32 --gap-horizon 8 --out "$out/evaluate" --overwrite

echo
echo "[5/5] summary"
python recipes/summary.py --teacher "$out/teacher" --student "$out/student" --evaluate "$out/evaluate" \
  --out "$out/summary.json" --seconds "${seconds[@]}" ${skipped[@]:+--skipped "${skipped[@]}"}
