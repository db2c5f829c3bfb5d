"""Summarise a teacher, its student and their evaluation: a few lines printed, one JSON file (the quickstart's last step).

    python recipes/summary.py --teacher runs/quickstart/teacher --student runs/quickstart/student \
        --evaluate runs/quickstart/evaluate                      # -> runs/quickstart/summary.json
    python recipes/summary.py ... --seconds pretrain=190 distill=150 --skipped tokenize

Reads result.json of the two training runs and metrics.json of the evaluation; prints the teacher's
and the student's val loss, their agreement, the compounding-error figures (teacher-forced accuracy
against rollouts, the exposure-bias gap), the exports, the report and the TensorBoard command.
"""

from __future__ import annotations

import os
import sys

# recipes/tokenize.py shares its name with the standard library's `tokenize`, which torch imports:
# keep this folder off the import path (no recipe imports another).
sys.path = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import json
from pathlib import Path

from pipeline import cli
from pipeline.errors import UsageError
from pipeline.files import write_json
from pipeline.studies import summary
from pipeline.studies.config import SummaryConfig

PRESETS = {"default": SummaryConfig}


def parse_seconds(items: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            raise UsageError(f"--seconds {item}: write NAME=SECONDS, e.g. pretrain=190") from None
    return out


def main(cfg: SummaryConfig) -> dict:
    if not (cfg.teacher and cfg.student and cfg.evaluate):
        raise UsageError(
            "pass --teacher RUN --student RUN --evaluate RUN (the three run folders to summarise)"
        )
    seconds = parse_seconds(cfg.seconds)
    unknown = [name for name in cfg.skipped if name not in seconds]
    if unknown:  # a skipped stage is reported among the stages timed, or it would vanish unsaid
        raise UsageError(
            f"--skipped {' '.join(unknown)}: no --seconds NAME=SECONDS for it; pass its seconds this "
            f"invocation spent on it (e.g. {unknown[0]}=0.4) beside the others"
        )
    teacher, student, evaluate = Path(cfg.teacher), Path(cfg.student), Path(cfg.evaluate)
    out = Path(cfg.out) if cfg.out else evaluate.parent / "summary.json"
    previous = json.loads(out.read_text()) if out.is_file() else None
    record = summary.summarise(teacher, student, evaluate)
    if seconds:
        record["stages"] = summary.stage_times(seconds, set(cfg.skipped), previous)
        record["wall_seconds"] = sum(seconds.values())
    record["summary"] = str(out)
    write_json(out, record, "the summary")
    print(f"summary ({out}):")
    for line in summary.lines(record):
        print(f"  {line}")
    return record


if __name__ == "__main__":
    cli.run(main, cli.parse(SummaryConfig, PRESETS))
