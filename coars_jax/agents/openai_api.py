"""The OpenAI-compatible chat-completions API, both ways.

- `OpenAIBackend` (client): an `AgentBackend` whose agents are served by any `/v1/chat/completions` endpoint (a
  base URL, one model name per agent, the key from an environment variable), with retries, a timeout, a
  concurrency limit, token counts and a cost, and a response cache keyed by the whole request, so a rerun costs
  nothing. It serves evaluation rows (zero-shot, Reflexion); it has no token ids or log-probs, so it cannot train.
- `make_server` (server): the project's own sampler behind `/v1/models` and `/v1/chat/completions` on a local
  port, the base model and each LoRA adapter as its own model id ('<name>' and '<name>:<adapter>'), so a trained
  recommender can be plugged into other tools (`experiments.serve`).

Only the standard library speaks HTTP here (urllib, http.server).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.server
import json
import os
import pathlib
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

import numpy as np

from coars_jax.agents.episodes import AGENTS, Generation, LLMBackend, LLMBackendConfig
from coars_jax.agents.prompts import Message
from coars_jax.sampling import LengthBuckets, SamplingParams

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpenAIConfig:
  """How the client reaches the endpoint.

  Attributes:
    base_url: the API root, e.g. 'http://127.0.0.1:8000/v1' or 'https://api.openai.com/v1'.
    models: the model name each agent is served by ({'recommender': ..., 'user': ...}).
    api_key_env: the environment variable that holds the key ('' sends none, as a local server needs).
    max_tokens: each agent's token budget per message.
    temperature, top_p: the sampling; temperature 0 is greedy.
    timeout: seconds per HTTP request.
    max_retries: retries of a request that failed with a transient status (429, 5xx) or a network error, with
      exponential back-off from `backoff` seconds.
    concurrency: requests in flight at once.
    cache_dir: a folder of responses keyed by the request's hash ('' = no cache); a rerun reads them and sends
      nothing.
    price_per_1k_prompt_tokens, price_per_1k_completion_tokens: for the row's cost (USD; 0 for a local server).
  """

  base_url: str
  models: Mapping[str, str]
  api_key_env: str = ''
  max_tokens: Mapping[str, int] = dataclasses.field(default_factory=lambda: {'recommender': 96, 'user': 64})
  temperature: float = 0.0
  top_p: float = 1.0
  timeout: float = 60.0
  max_retries: int = 4
  backoff: float = 0.5
  concurrency: int = 4
  cache_dir: str = ''
  price_per_1k_prompt_tokens: float = 0.0
  price_per_1k_completion_tokens: float = 0.0

  def __post_init__(self):
    if not isinstance(self.base_url, str) or not self.base_url.startswith(('http://', 'https://')):
      raise ValueError(f'OpenAIConfig.base_url must be an http(s) URL, found {self.base_url!r}')
    missing = [agent for agent in AGENTS if not self.models.get(agent)]
    if missing:
      raise ValueError(f'OpenAIConfig.models needs a model name for {missing}')
    if self.api_key_env and not os.environ.get(self.api_key_env):
      raise ValueError(f'OpenAIConfig.api_key_env names {self.api_key_env!r}, which is not set in the environment')
    for name in ('max_retries', 'concurrency'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == 'max_retries' else 1):
        raise ValueError(f'OpenAIConfig.{name} must be an int >= {0 if name == "max_retries" else 1}, found {value!r}')
    if not self.timeout > 0:
      raise ValueError(f'OpenAIConfig.timeout must be positive, found {self.timeout!r}')


class APIError(RuntimeError):
  """A request that failed for good (a non-transient status, or retries exhausted)."""


class OpenAIBackend:
  """An `AgentBackend` on a chat-completions endpoint: one request per prompt, `concurrency` at a time.

  `usage` counts requests, cache hits, prompt and completion tokens (as the endpoint reports them) and the cost.
  Generations carry the text and whether it stopped by itself; their token ids and log-probs are empty (an API
  does not return the ids), so rollouts from this backend can be evaluated but not trained on.
  """

  def __init__(self, config: OpenAIConfig):
    self.config = config
    self.calls: list[Any] = []
    self.usage = {'requests': 0, 'cached': 0, 'prompt_tokens': 0, 'completion_tokens': 0, 'cost_usd': 0.0,
                  'retries': 0}
    self._lock = threading.Lock()

  def clear_prefixes(self) -> None:
    """Nothing is kept between calls (the `LLMBackend` interface)."""

  def _request(self, body: dict[str, Any]) -> dict[str, Any]:
    config = self.config
    key = hashlib.sha256(json.dumps({'url': config.base_url, **body}, sort_keys=True).encode()).hexdigest()
    cached = pathlib.Path(config.cache_dir) / key[:2] / f'{key}.json' if config.cache_dir else None
    if cached is not None and cached.is_file():
      with self._lock:
        self.usage['cached'] += 1
      return json.loads(cached.read_text(encoding='utf-8'))
    headers = {'Content-Type': 'application/json'}
    if config.api_key_env:
      headers['Authorization'] = f'Bearer {os.environ[config.api_key_env]}'
    request = urllib.request.Request(config.base_url.rstrip('/') + '/chat/completions',
                                     data=json.dumps(body).encode(), headers=headers, method='POST')
    for attempt in range(config.max_retries + 1):
      try:
        with urllib.request.urlopen(request, timeout=config.timeout) as response:
          answer = json.loads(response.read().decode('utf-8'))
        break
      except urllib.error.HTTPError as error:
        detail = error.read().decode('utf-8', 'replace')[:300]
        if error.code not in RETRY_STATUS or attempt == config.max_retries:
          raise APIError(f'{config.base_url}: HTTP {error.code} for model {body["model"]!r}: {detail}') from error
      except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        if attempt == config.max_retries:
          raise APIError(f'{config.base_url}: {error} after {attempt + 1} attempts') from error
      with self._lock:
        self.usage['retries'] += 1
      time.sleep(config.backoff * 2 ** attempt)
    usage = answer.get('usage') or {}
    with self._lock:
      self.usage['requests'] += 1
      self.usage['prompt_tokens'] += int(usage.get('prompt_tokens', 0))
      self.usage['completion_tokens'] += int(usage.get('completion_tokens', 0))
      self.usage['cost_usd'] += (int(usage.get('prompt_tokens', 0)) * config.price_per_1k_prompt_tokens
                                 + int(usage.get('completion_tokens', 0)) * config.price_per_1k_completion_tokens
                                 ) / 1000.0
    if cached is not None:
      cached.parent.mkdir(parents=True, exist_ok=True)
      tmp = cached.with_suffix('.tmp')
      tmp.write_text(json.dumps(answer), encoding='utf-8')
      tmp.replace(cached)
    return answer

  def generate(self, agent: str, prompts: Sequence[Sequence[Message]], *, seed: int, episode_ids: Sequence[int],
               turn: int, candidates: Sequence[Sequence[str]] | None = None) -> list[Generation]:
    del candidates  # an API cannot decode under the project's grammars
    from coars_jax.agents.episodes import BackendCall  # the call log `LLMBackend` keeps too
    self.calls.append(BackendCall(agent=agent, turn=turn, seed=seed, episode_ids=tuple(int(e) for e in episode_ids)))
    config = self.config
    bodies = [{'model': config.models[agent], 'messages': [dict(m) for m in messages],
               'max_tokens': int(config.max_tokens[agent]), 'temperature': float(config.temperature),
               'top_p': float(config.top_p), 'seed': int(seed), 'n': 1} for messages in prompts]
    with concurrent.futures.ThreadPoolExecutor(max_workers=config.concurrency) as pool:
      answers = list(pool.map(self._request, bodies))
    out = []
    for messages, answer in zip(prompts, answers):
      choice = answer['choices'][0]
      empty = np.zeros(0, np.int32)
      out.append(Generation(prompt_text=json.dumps([dict(m) for m in messages], ensure_ascii=False),
                            prompt_ids=empty, completion_ids=empty, log_probs=np.zeros(0, np.float32),
                            text=choice['message']['content'] or '', finished=choice.get('finish_reason') == 'stop'))
    return out


# --- the server --------------------------------------------------------------------------------------------------

def make_server(model, tokenizer, *, name: str, host: str = '127.0.0.1', port: int = 8000,
                max_new_tokens: int = 256, buckets: LengthBuckets = LengthBuckets()) -> http.server.ThreadingHTTPServer:
  """An HTTP server (not yet serving: call `serve_forever`) with `/v1/models` and `/v1/chat/completions` on the
  project's sampler: model '<name>' is the base, '<name>:<adapter>' each of `model`'s LoRA adapters. One request
  is generated at a time (greedy for temperature 0); `max_tokens` is capped at `max_new_tokens`."""
  ids = [name] + [f'{name}:{adapter}' for adapter in model.adapter_names]
  backends: dict[tuple, LLMBackend] = {}
  lock = threading.Lock()

  def backend_for(model_id: str, max_tokens: int, temperature: float, top_p: float) -> LLMBackend:
    adapter = model_id.partition(':')[2] or None
    key = (adapter, max_tokens, temperature, top_p)
    if key not in backends:
      # The adapter runs as the 'user' agent's; both agents' budgets are the request's.
      backends[key] = LLMBackend(model, tokenizer, adapters={'user': adapter} if adapter else None,
                                 config=LLMBackendConfig(
                                     recommender_max_new_tokens=max_tokens, user_max_new_tokens=max_tokens,
                                     sampling=SamplingParams(temperature=temperature, top_p=top_p),
                                     buckets=buckets, prefix_reuse=False))
    return backends[key]

  class Handler(http.server.BaseHTTPRequestHandler):
    server_version = 'coars_jax'

    def log_message(self, format, *args):  # noqa: A002 (the base class's name); quiet by default
      del format, args

    def _send(self, status: int, value: dict[str, Any]) -> None:
      payload = json.dumps(value).encode()
      self.send_response(status)
      self.send_header('Content-Type', 'application/json')
      self.send_header('Content-Length', str(len(payload)))
      self.end_headers()
      self.wfile.write(payload)

    def _error(self, status: int, message: str) -> None:
      self._send(status, {'error': {'message': message, 'type': 'invalid_request_error'}})

    def do_GET(self):  # noqa: N802 (http.server's name)
      if self.path.rstrip('/') != '/v1/models':
        return self._error(404, f'no route {self.path}; try /v1/models or POST /v1/chat/completions')
      self._send(200, {'object': 'list', 'data': [{'id': i, 'object': 'model', 'owned_by': 'coars_jax'}
                                                  for i in ids]})

    def do_POST(self):  # noqa: N802
      if self.path.rstrip('/') != '/v1/chat/completions':
        return self._error(404, f'no route {self.path}')
      try:
        body = json.loads(self.rfile.read(int(self.headers.get('Content-Length', 0))) or b'{}')
        model_id, messages = body['model'], body['messages']
      except (ValueError, KeyError) as error:
        return self._error(400, f'the body must be JSON with "model" and "messages" ({error})')
      if model_id not in ids:
        return self._error(404, f'model {model_id!r} is not served; models: {ids}')
      if not isinstance(messages, list) or not all(isinstance(m, dict) and {'role', 'content'} <= set(m)
                                                   for m in messages):
        return self._error(400, '"messages" must be a list of {"role", "content"} objects')
      if int(body.get('n', 1)) != 1:
        return self._error(400, 'only n = 1 is served')
      max_tokens = max(1, min(int(body.get('max_tokens') or max_new_tokens), max_new_tokens))
      temperature, top_p = float(body.get('temperature', 1.0)), float(body.get('top_p', 1.0))
      with lock:
        backend = backend_for(model_id, max_tokens, temperature, top_p)
        generation = backend.generate('user', [[{'role': m['role'], 'content': m['content']} for m in messages]],
                                      seed=int(body.get('seed') or 0), episode_ids=[0], turn=1)[0]
      prompt_tokens, completion_tokens = len(generation.prompt_ids), len(generation.completion_ids)
      self._send(200, {
          'id': f'chatcmpl-{hashlib.sha256(generation.prompt_text.encode()).hexdigest()[:16]}',
          'object': 'chat.completion', 'created': int(time.time()), 'model': model_id,
          'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': generation.text},
                       'finish_reason': 'stop' if generation.finished else 'length'}],
          'usage': {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
                    'total_tokens': prompt_tokens + completion_tokens}})

  return http.server.ThreadingHTTPServer((host, port), Handler)
