#!/usr/bin/env bash
# Screenshots of TensorBoard's dashboards for a runs folder, in headless Chromium (Debian's `chromium`).
#   bash launch/tensorboard_screens.sh RUNS_DIR [OUT_DIR] [--views timeseries,images,...] [--timeout S]
# Serves TensorBoard on 127.0.0.1 (a free port), writes OUT_DIR/NN-<view>.png (default RUNS_DIR/screens),
# prints their paths and stops TensorBoard (also on errors and Ctrl-C). Views: timeseries,
# timeseries-groups (every group closed: their order and sizes),
# timeseries-loss (?tagFilter=^Loss/: train and val loss), scalars, images, text,
# projector, hparams, custom-scalars; a view whose plugin has no data is skipped with a note.
set -euo pipefail
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
# The Python side starts TensorBoard in its own process group and stops it in a finally block; the
# trap covers a kill of this shell too, by forwarding the signal to it.
"${PYTHON:-python}" "$here/tensorboard_screens.py" "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" || true' INT TERM
wait "$pid"
