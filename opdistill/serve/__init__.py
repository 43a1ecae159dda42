"""`opdistill serve`: one model behind a subset of vLLM's OpenAI-compatible HTTP API, concurrent requests batched.

Why: a white-box teacher (prompt log-probs) can then run on another machine without vLLM, and tests get a real
server. Field names follow vLLM's server (https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html,
"Extra parameters" of the Completions API: `prompt_logprobs`) and vllm/logprobs.py, where PromptLogprobs is None
for the first prompt token (nothing predicts it) and {token id: {logprob, rank, decoded_token}} for each later one.

Imports point down this list (the submodules import each other directly, never this package):
  protocol   options, vLLM's error shape, field checks (no torch)
  batching   jobs, and the batcher that gathers concurrent requests' rows into one pass (no torch)
  forward    the packed and padded forward passes: scoring and generation (torch; loaded with the model)
  app        the endpoints: checks and tokenising, then the model's jobs as steps of a generator
  asgi       one HTTP request (Starlette on uvicorn): the API key, the body, routing, the deadline, cancellation
  server     uvicorn and the connection limits; make_server and serve
"""

from .batching import SCORE_CHUNK, Batcher
from .protocol import RequestError, ServeOptions
from .app import ModelServer
from .asgi import ROUTES, Api
from .server import Server, make_server, serve

__all__ = ["ROUTES", "SCORE_CHUNK", "Api", "Batcher", "ModelServer", "RequestError", "Server", "ServeOptions", "make_server", "serve"]
