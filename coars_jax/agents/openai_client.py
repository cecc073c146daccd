"""The client side of the OpenAI-compatible chat-completions API: `OpenAIConfig` (how to reach an endpoint: its base
URL, one model name per agent, the key's environment variable, the token budgets and sampling, retries, timeout,
concurrency, cache folder and prices) and `OpenAIBackend`, an `AgentBackend` that sends one `/v1/chat/completions`
request per prompt over urllib, retries transient failures (`RETRY_STATUS`, network errors) with exponential
back-off, raises `APIError` on a failure for good, counts tokens and cost, and caches each response under the hash of
its whole request so that a rerun sends nothing. It serves evaluation rows only (no token ids or log-probs).
`agents.openai_api` re-exports all of it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

import numpy as np

from coars_jax.agents.episodes import AGENTS, Generation
from coars_jax.agents.prompts import Message

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
    self.usage = {'requests': 0, 'cached': 0, 'prompt_tokens': 0, 'completion_tokens': 0, 'cost_usd': 0.0, 'retries': 0}
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
    request = urllib.request.Request(
      config.base_url.rstrip('/') + '/chat/completions', data=json.dumps(body).encode(), headers=headers, method='POST'
    )
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
      time.sleep(config.backoff * 2**attempt)
    usage = answer.get('usage') or {}
    with self._lock:
      self.usage['requests'] += 1
      self.usage['prompt_tokens'] += int(usage.get('prompt_tokens', 0))
      self.usage['completion_tokens'] += int(usage.get('completion_tokens', 0))
      self.usage['cost_usd'] += (
        int(usage.get('prompt_tokens', 0)) * config.price_per_1k_prompt_tokens
        + int(usage.get('completion_tokens', 0)) * config.price_per_1k_completion_tokens
      ) / 1000.0
    if cached is not None:
      cached.parent.mkdir(parents=True, exist_ok=True)
      tmp = cached.with_suffix('.tmp')
      tmp.write_text(json.dumps(answer), encoding='utf-8')
      tmp.replace(cached)
    return answer

  def generate(
    self,
    agent: str,
    prompts: Sequence[Sequence[Message]],
    *,
    seed: int,
    episode_ids: Sequence[int],
    turn: int,
    candidates: Sequence[Sequence[str]] | None = None,
  ) -> list[Generation]:
    del candidates  # an API cannot decode under the project's grammars
    from coars_jax.agents.episodes import BackendCall  # the call log `LLMBackend` keeps too

    self.calls.append(BackendCall(agent=agent, turn=turn, seed=seed, episode_ids=tuple(int(e) for e in episode_ids)))
    config = self.config
    bodies = [
      {
        'model': config.models[agent],
        'messages': [dict(m) for m in messages],
        'max_tokens': int(config.max_tokens[agent]),
        'temperature': float(config.temperature),
        'top_p': float(config.top_p),
        'seed': int(seed),
        'n': 1,
      }
      for messages in prompts
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=config.concurrency) as pool:
      answers = list(pool.map(self._request, bodies))
    out = []
    for messages, answer in zip(prompts, answers):
      choice = answer['choices'][0]
      empty = np.zeros(0, np.int32)
      out.append(
        Generation(
          prompt_text=json.dumps([dict(m) for m in messages], ensure_ascii=False),
          prompt_ids=empty,
          completion_ids=empty,
          log_probs=np.zeros(0, np.float32),
          text=choice['message']['content'] or '',
          finished=choice.get('finish_reason') == 'stop',
        )
      )
    return out
