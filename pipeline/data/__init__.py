"""Data: corpus sources, tokenizers, vocabulary compaction, the tokenize stage, token shards and their windows."""
