"""The OpenAI-compatible chat-completions API, both ways.

- `OpenAIBackend` (client): an `AgentBackend` whose agents are served by any `/v1/chat/completions` endpoint (a
  base URL, one model name per agent, the key from an environment variable), with retries, a timeout, a
  concurrency limit, token counts and a cost, and a response cache keyed by the whole request, so a rerun costs
  nothing. It serves evaluation rows (zero-shot, Reflexion); it has no token ids or log-probs, so it cannot train.
- `make_server` (server): the project's own sampler behind `/v1/models` and `/v1/chat/completions` on a local
  port, the base model and each LoRA adapter as its own model id ('<name>' and '<name>:<adapter>'), so a trained
  recommender can be plugged into other tools (`experiments.serve`). It checks every request before any work
  (`parse_chat_request`) and answers each refusal or failure with an OpenAI-style JSON error and status; a request
  cannot compile a shape outside the buckets, and nothing kept grows with the number of requests.

Only the standard library speaks HTTP here (urllib, http.server).

The code lives in three modules, re-exported here (import from this one): `openai_client` (`OpenAIConfig`,
`OpenAIBackend`, `APIError`), `openai_schema` (the request schema and `parse_chat_request`) and `openai_server`
(`make_server`).
"""

from coars_jax.agents.openai_client import RETRY_STATUS, APIError, OpenAIBackend, OpenAIConfig
from coars_jax.agents.openai_schema import (
  KNOWN_FIELDS,
  MAX_TEMPERATURE,
  MESSAGE_FIELDS,
  NEUTRAL_FIELDS,
  ROLES,
  SAMPLING_FIELDS,
  SAMPLING_STEP,
  SEED_RANGE,
  ChatRequest,
  RequestError,
  parse_chat_request,
)
from coars_jax.agents.openai_server import DRAIN_LIMIT, make_server
from coars_jax.agents.openai_server import logger as logger  # the server's logger, as before the split

__all__ = [
  'APIError',
  'ChatRequest',
  'DRAIN_LIMIT',
  'KNOWN_FIELDS',
  'MAX_TEMPERATURE',
  'MESSAGE_FIELDS',
  'NEUTRAL_FIELDS',
  'OpenAIBackend',
  'OpenAIConfig',
  'RETRY_STATUS',
  'ROLES',
  'RequestError',
  'SAMPLING_FIELDS',
  'SAMPLING_STEP',
  'SEED_RANGE',
  'make_server',
  'parse_chat_request',
]
