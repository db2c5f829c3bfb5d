"""The model: one configurable GPT (device-free), and autoregressive generation with a KV cache."""
