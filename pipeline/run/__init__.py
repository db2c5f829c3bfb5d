"""What a run leaves behind: its self-describing folder, what it reports (TensorBoard, metrics.jsonl), checkpoints."""
