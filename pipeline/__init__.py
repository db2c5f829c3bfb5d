"""gpt-distill's library: one subpackage per concern, dependencies pointing one way.

    errors    what a user can act on (imports nothing)
    config    the shared typed configs      files   atomic JSON, env.json provenance
    accel     the only device module        cli     presets, config files, flags
    data      corpus, tokenizer, vocabulary, the tokenize stage, shards and windows
    model     the GPT, generation, the memory account, mask numerics
    run       run folders, tracking (TensorBoard, metrics.jsonl), checkpoints
    train     batching, losses, optimizer, the loop, noise scale, gradient diagnostics, stage set-up
    eval      teacher-forced metrics, compounding errors, probes (heads, embeddings), the report
    distill   divergences, the KD head, the teacher, batches, the objective, the cache
    studies   batch-size scaling, the LR range test, the benchmark, comparisons of variants

A module may import only from its own layer or the layers above it in `LAYERS`;
tests/test_layering.py enforces it (type-only imports included) and refuses import cycles.
"""

LAYERS = (
    ("errors",),
    ("config", "files"),
    ("accel", "cli"),
    ("data",),
    ("model",),
    ("run",),
    ("train",),
    ("eval",),
    ("distill",),
    ("studies",),
)
