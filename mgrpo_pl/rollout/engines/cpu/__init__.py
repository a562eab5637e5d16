"""The transformers engine's CPU fast path: incremental decoding with reserved KV caches, a cross-call prefix
cache, and oneDNN-packed (or weight-major) linears for one-token decode steps."""
