"""lmserve: an LLM inference server (paged KV cache, continuous batching, OpenAI-compatible HTTP, gRPC)."""
