"""Evaluation: teacher-forced metrics, compounding errors of free-running generation, probes, the report."""
