"""Where teacher signal comes from: an OpenAI-compatible API, or a local model; and the durable store."""
