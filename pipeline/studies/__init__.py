"""Studies over many runs or cases: the batch-size scaling study, the LR range test's analysis, the benchmark."""
