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
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import http.server
import json
import logging
import math
import os
import pathlib
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping, Sequence

import numpy as np

from coars_jax.agents.episodes import AGENTS, Generation, LLMBackend, LLMBackendConfig, encode_prompt
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


# --- the server --------------------------------------------------------------------------------------------------

ROLES = ('system', 'user', 'assistant')
# Sampling settings are static under jit (each distinct one compiles a decode program), so the server rounds
# temperature and top_p to this grid: at most 41 x 20 settings can ever be compiled, whatever clients send.
SAMPLING_STEP = 0.05
MAX_TEMPERATURE = 2.0  # OpenAI's range
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit seed, as OpenAI's; jax.random.key takes all of them
# Fields that OpenAI clients send by habit, accepted only at the value that changes nothing here (and null, which
# means "unset" for every optional field); anything else names a feature this server does not have.
NEUTRAL_FIELDS: dict[str, tuple[str, Any]] = {
  'stream': ('false', lambda value: value is False),
  'stream_options': ('null', lambda value: False),
  'n': ('1', lambda value: _is_int(value) and value == 1),
  'stop': ('null or []', lambda value: value == []),
  'frequency_penalty': ('0', lambda value: _is_number(value) and value == 0),
  'presence_penalty': ('0', lambda value: _is_number(value) and value == 0),
  'logprobs': ('false', lambda value: value is False),
  'top_logprobs': ('0', lambda value: _is_int(value) and value == 0),
  'logit_bias': ('{}', lambda value: value == {}),
  'tools': ('[]', lambda value: value == []),
  'tool_choice': ("'none'", lambda value: value == 'none'),
  'parallel_tool_calls': ('a bool', lambda value: isinstance(value, bool)),
  'response_format': ("{'type': 'text'}", lambda value: value == {'type': 'text'}),
  'user': ('a string (an end-user id; ignored)', lambda value: isinstance(value, str)),
}
DRAIN_LIMIT = 16 << 20  # bytes of a refused body read (64 KiB at a time) and dropped before closing
SAMPLING_FIELDS = ('max_tokens', 'max_completion_tokens', 'temperature', 'top_p', 'seed')
KNOWN_FIELDS = ('model', 'messages') + SAMPLING_FIELDS + tuple(NEUTRAL_FIELDS)
MESSAGE_FIELDS = ('role', 'content', 'name')  # 'name' labels a participant; the chat template ignores it

logger = logging.getLogger(__name__)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not the integer 1


def _is_number(value: Any) -> bool:
  return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _raise(error: Exception):
  raise error


def _shown(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + '...'


class RequestError(Exception):
  """A request the server refuses (before any work): its HTTP status and the fields of OpenAI's error body."""

  def __init__(
    self,
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    kind: str = 'invalid_request_error',
  ):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

  def body(self) -> dict[str, Any]:
    return {'error': {'message': self.message, 'type': self.kind, 'param': self.param, 'code': self.code}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatRequest:
  """A checked chat-completions request, its sampling on the server's grid.

  Attributes:
    model: a served model id ('<name>' or '<name>:<adapter>').
    messages: the conversation, each {'role', 'content'} with a role from `ROLES`.
    max_tokens: the completion budget, in [1, the server's max_new_tokens] (larger requests are capped).
    temperature: in [0, 2], rounded to `SAMPLING_STEP`; 0 is greedy.
    top_p: in (0, 1], rounded to `SAMPLING_STEP` (at least one step); 1.0 under greedy decoding, which ignores it.
    seed: the sampling seed (0 when the request has none).
  """

  model: str
  messages: tuple[Message, ...]
  max_tokens: int
  temperature: float
  top_p: float
  seed: int

  @property
  def adapter(self) -> str | None:
    return self.model.partition(':')[2] or None


def _optional_number(
  body: Mapping[str, Any], field: str, *, low: float, high: float, low_open: bool = False, integer: bool = False
) -> Any:
  """body[field] when it is a number (an int if `integer`) in [low, high] ((low, high] if `low_open`); None when
  absent or null; otherwise a 400 naming the field, the range and what was found."""
  value = body.get(field)
  if value is None:
    return None
  kind = 'an integer' if integer else 'a number'
  interval = f'{"(" if low_open else "["}{low}, {high}]'
  # Compared before any float conversion: a 400-digit integer must not overflow on the way to its 400.
  if (
    not (_is_int(value) if integer else _is_number(value)) or value > high or value < low or (low_open and value == low)
  ):
    raise RequestError(400, f'{field} must be {kind} in {interval}, found {_shown(value)}', param=field)
  return value


def _on_grid(value: float) -> float:
  return round(round(value / SAMPLING_STEP) * SAMPLING_STEP, 6)


def parse_chat_request(raw: bytes, *, model_ids: Sequence[str], max_new_tokens: int) -> ChatRequest:
  """The checked request in a `/v1/chat/completions` body, or a `RequestError` naming the first bad field: every
  field is checked for type, range and allowed values before the server does any work."""
  try:
    body = json.loads(raw.decode('utf-8'), parse_constant=lambda name: _raise(ValueError(f'{name} is not JSON')))
  except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
    raise RequestError(
      400, f'the body must be UTF-8 JSON: {str(error)[:200]}', param='body', code='invalid_json'
    ) from None
  if not isinstance(body, dict):
    raise RequestError(400, f'the body must be a JSON object, found {type(body).__name__}', param='body')
  unknown = sorted(set(body) - set(KNOWN_FIELDS))
  if unknown:
    raise RequestError(
      400, f'unknown field {_shown(unknown[0])}; this server reads {list(KNOWN_FIELDS)}', param=unknown[0]
    )
  model_id = body.get('model')
  if not isinstance(model_id, str):
    raise RequestError(400, f'model must be a string (a model id), found {_shown(model_id)}', param='model')
  if model_id not in model_ids:
    raise RequestError(
      404, f'model {_shown(model_id)} is not served; models: {list(model_ids)}', param='model', code='model_not_found'
    )
  messages = body.get('messages')
  if not isinstance(messages, list) or not messages:
    raise RequestError(
      400,
      f'messages must be a non-empty list of {{"role", "content"}} objects, found {_shown(messages)}',
      param='messages',
    )
  checked = []
  for index, message in enumerate(messages):
    where = f'messages[{index}]'
    if not isinstance(message, dict):
      raise RequestError(400, f'{where} must be an object, found {_shown(message)}', param=where)
    extra = sorted(set(message) - set(MESSAGE_FIELDS))
    if extra:
      raise RequestError(
        400,
        f'{where}.{extra[0]} is not served (no tools); a message has {list(MESSAGE_FIELDS)}',
        param=f'{where}.{extra[0]}',
      )
    if not isinstance(message.get('role'), str) or message['role'] not in ROLES:
      raise RequestError(
        400, f'{where}.role must be one of {list(ROLES)}, found {_shown(message.get("role"))}', param=f'{where}.role'
      )
    if not isinstance(message.get('content'), str):
      raise RequestError(
        400,
        f'{where}.content must be a string (no content parts), found {_shown(message.get("content"))}',
        param=f'{where}.content',
      )
    if not isinstance(message.get('name', ''), str):
      raise RequestError(400, f'{where}.name must be a string, found {_shown(message["name"])}', param=f'{where}.name')
    checked.append({'role': message['role'], 'content': message['content']})
  budgets = {}
  for field in ('max_tokens', 'max_completion_tokens'):
    # Any budget above the server's cap is served at the cap (finish_reason 'length' says so); a compile per
    # value cannot happen, since the count is traced and the buffer is the cap's bucket.
    value = _optional_number(body, field, low=1, high=math.inf, integer=True)
    if value is not None:
      budgets[field] = min(value, max_new_tokens)
  if len(set(budgets.values())) > 1:
    raise RequestError(
      400,
      f'max_tokens ({body["max_tokens"]}) and max_completion_tokens '
      f'({body["max_completion_tokens"]}) disagree; send one',
      param='max_completion_tokens',
    )
  temperature = _optional_number(body, 'temperature', low=0.0, high=MAX_TEMPERATURE)
  top_p = _optional_number(body, 'top_p', low=0.0, high=1.0, low_open=True)
  seed = _optional_number(body, 'seed', low=SEED_RANGE[0], high=SEED_RANGE[1], integer=True)
  for field, (allowed, accepts) in NEUTRAL_FIELDS.items():
    if body.get(field) is not None and not accepts(body[field]):
      raise RequestError(
        400, f'{field} must be {allowed} (or absent) on this server, found {_shown(body[field])}', param=field
      )
  temperature = _on_grid(1.0 if temperature is None else temperature)
  # Greedy decoding has no nucleus (SamplingParams refuses top_p < 1 with temperature 0).
  top_p = 1.0 if temperature == 0 else max(SAMPLING_STEP, _on_grid(1.0 if top_p is None else top_p))
  return ChatRequest(
    model=model_id,
    messages=tuple(checked),
    max_tokens=next(iter(budgets.values()), max_new_tokens),
    temperature=temperature,
    top_p=top_p,
    seed=0 if seed is None else seed,
  )


class _ChatServer(http.server.ThreadingHTTPServer):
  # Connections waiting to be accepted: the default of 5 makes the 6th of a burst wait a second for a SYN retry.
  request_queue_size = 128


def make_server(
  model,
  tokenizer,
  *,
  name: str,
  host: str = '127.0.0.1',
  port: int = 8000,
  max_new_tokens: int = 256,
  buckets: LengthBuckets = LengthBuckets(),
  max_body_bytes: int = 1 << 20,
  max_backends: int = 4,
  max_dialogues: int = 64,
  max_pending: int = 64,
  timeout: float = 30.0,
) -> http.server.ThreadingHTTPServer:
  """An HTTP server (not yet serving: call `serve_forever`) with `/v1/models` and `/v1/chat/completions` on the
  project's sampler: model '<name>' is the base, '<name>:<adapter>' each of `model`'s LoRA adapters.

  One request is generated at a time (greedy for temperature 0). Every request is checked before any work
  (`parse_chat_request`); a refusal is an OpenAI-style JSON error with the status: 400 a bad field (named in
  `param`), 404 an unknown model or route, 405 a wrong method, 408 a body not sent within `timeout`, 411 no
  Content-Length, 413 a body over `max_body_bytes` (not read), 503 more than `max_pending` requests waiting, 500
  an unexpected failure (the server stays up). The prompt must fit the largest prompt bucket; `max_tokens` is
  capped at `max_new_tokens`, which must fit the largest completion bucket, so no request compiles a shape
  outside `buckets`. Backends (one per adapter, budget and sampling setting) are kept in an LRU of
  `max_backends` (the server's `backends`); each keeps the token ids of at most `max_dialogues` conversations, so
  that a request continuing one (its messages but the last = an earlier request's messages and reply) is encoded
  as the in-process backend encodes its next turn (the server's `dialogues`, an LRU from conversation to slot)."""
  if not _is_int(max_new_tokens) or not 1 <= max_new_tokens <= buckets.completion[-1]:
    raise ValueError(
      f'make_server: max_new_tokens must be an int in [1, {buckets.completion[-1]}] (the largest '
      f'completion bucket), found {max_new_tokens!r}'
    )
  for field, value in (
    ('max_body_bytes', max_body_bytes),
    ('max_backends', max_backends),
    ('max_dialogues', max_dialogues),
    ('max_pending', max_pending),
  ):
    if not _is_int(value) or value < 1:
      raise ValueError(f'make_server: {field} must be a positive int, found {value!r}')
  if not _is_number(timeout) or timeout <= 0:
    raise ValueError(f'make_server: timeout must be a positive number of seconds, found {timeout!r}')
  ids = [name] + [f'{name}:{adapter}' for adapter in model.adapter_names]
  longest_prompt = buckets.prompt[-1]
  positions = model.config.max_position_embeddings
  backends: collections.OrderedDict[tuple, LLMBackend] = collections.OrderedDict()
  dialogue_slots: collections.OrderedDict[str, int] = collections.OrderedDict()  # conversation -> episode slot
  lock = threading.Lock()  # one generation at a time; the tokenizer and the LRU are used under it too
  pending = threading.BoundedSemaphore(max_pending)

  def backend_for(request: ChatRequest) -> LLMBackend:
    key = (request.adapter, request.max_tokens, request.temperature, request.top_p)
    if key in backends:
      backends.move_to_end(key)
    else:
      # The adapter runs as the 'user' agent's; both agents' budgets are the request's.
      backends[key] = LLMBackend(
        model,
        tokenizer,
        adapters={'user': request.adapter} if request.adapter else None,
        config=LLMBackendConfig(
          recommender_max_new_tokens=request.max_tokens,
          user_max_new_tokens=request.max_tokens,
          sampling=SamplingParams(temperature=request.temperature, top_p=request.top_p),
          buckets=buckets,
          prefix_reuse=False,
        ),
      )
      while len(backends) > max_backends:
        backends.popitem(last=False)
    return backends[key]

  def check_prompt(request: ChatRequest) -> None:
    try:
      _, prompt_ids = encode_prompt(tokenizer, request.messages)
    except Exception as error:  # noqa: BLE001 (a chat template may refuse a role order, a tokenizer a surrogate)
      raise RequestError(
        400,
        f'messages could not be rendered and tokenized: {type(error).__name__}: {str(error)[:200]}',
        param='messages',
      ) from None
    if not prompt_ids:
      raise RequestError(400, 'messages render to an empty prompt', param='messages')
    if len(prompt_ids) > longest_prompt:
      raise RequestError(
        400,
        f"messages make a prompt of {len(prompt_ids)} tokens, over this server's limit of "
        f'{longest_prompt} tokens (its largest prompt bucket)',
        param='messages',
        code='context_length_exceeded',
      )
    if len(prompt_ids) + request.max_tokens > positions:
      raise RequestError(
        400,
        f'the prompt ({len(prompt_ids)} tokens) plus max_tokens ({request.max_tokens}) '
        f"exceed the model's {positions} positions; lower max_tokens",
        param='max_tokens',
        code='context_length_exceeded',
      )

  def dialogue_key(request: ChatRequest, messages: Sequence[Message]) -> str:
    settings = (request.adapter, request.max_tokens, request.temperature, request.top_p)
    return hashlib.sha256(json.dumps([settings, list(messages)]).encode()).hexdigest()

  def dialogue_slot(request: ChatRequest) -> tuple[int, str | None]:
    """(the episode slot to run `request` in, the key of the kept conversation it continues or None). A request
    whose messages but the last are an earlier request's messages and reply runs in that request's slot, where the
    backend appends to the conversation's kept token ids as the in-process backend does (the backend checks the
    text itself); any other takes a free slot, or the least recently used one."""
    key = dialogue_key(request, request.messages[:-1])
    if len(request.messages) >= 3 and key in dialogue_slots:
      return dialogue_slots[key], key
    free = sorted(set(range(max_dialogues)) - set(dialogue_slots.values()))
    return (free[0] if free else dialogue_slots.popitem(last=False)[1]), None

  def complete(request: ChatRequest) -> dict[str, Any]:
    with lock:
      check_prompt(request)
      backend = backend_for(request)
      slot, continued = dialogue_slot(request)
      run = lambda: backend.generate(
        'user',
        [list(request.messages)],
        seed=request.seed,  # noqa: E731
        episode_ids=[slot],
        turn=1,
      )[0]
      try:
        try:
          generation = run()
        except ValueError:
          if continued is None:
            raise
          # The appended ids outgrew the buckets: tokenize the prompt whole, as checked to fit.
          backend.clear_prefixes()
          generation = run()
      finally:
        backend.calls.clear()  # its call log would otherwise grow by one entry per request
      # The slot now holds this request's prompt and reply, which only the next turn can continue.
      dialogue_slots.pop(continued, None)
      reply = {'role': 'assistant', 'content': generation.text}
      dialogue_slots[dialogue_key(request, list(request.messages) + [reply])] = slot
    prompt_tokens, completion_tokens = len(generation.prompt_ids), len(generation.completion_ids)
    return {
      'id': f'chatcmpl-{hashlib.sha256(generation.prompt_text.encode()).hexdigest()[:16]}',
      'object': 'chat.completion',
      'created': int(time.time()),
      'model': request.model,
      'choices': [
        {
          'index': 0,
          'message': {'role': 'assistant', 'content': generation.text},
          'finish_reason': 'stop' if generation.finished else 'length',
        }
      ],
      'usage': {
        'prompt_tokens': prompt_tokens,
        'completion_tokens': completion_tokens,
        'total_tokens': prompt_tokens + completion_tokens,
      },
    }

  class Handler(http.server.BaseHTTPRequestHandler):
    server_version = 'coars_jax'
    unread_body = False  # set when a refusal leaves the client's body unread

    def setup(self):
      # A socket timeout bounds how long a slow or silent client holds a thread (reads and writes alike).
      self.timeout = timeout
      super().setup()

    def log_message(self, format, *args):  # noqa: A002 (the base class's name); quiet by default
      del format, args

    def _send(self, status: int, value: dict[str, Any]) -> None:
      payload = json.dumps(value).encode()
      self.send_response(status)
      self.send_header('Content-Type', 'application/json')
      self.send_header('Content-Length', str(len(payload)))
      self.end_headers()
      self.wfile.write(payload)

    def _error(self, error: RequestError) -> None:
      self._send(error.status, error.body())

    def send_error(self, code, message=None, explain=None):
      """http.server's own refusals (a malformed request line or header) in the same JSON shape."""
      self.close_connection = True
      text = message or self.responses.get(code, ('error',))[0]
      self._error(RequestError(code, f'{text}{": " + explain if explain else ""}'))

    def _route(self) -> str:
      return urllib.parse.urlsplit(self.path).path.rstrip('/')

    def _guarded(self, serve) -> None:
      """Runs `serve`, answering a `RequestError` with its status and anything unexpected with a 500, so that no
      request drops its connection and the server stays up."""
      try:
        serve()
      except RequestError as error:
        self._refuse(error)
      except (ConnectionError, TimeoutError) as error:
        logger.info('coars_jax server: %s %s: connection lost (%s)', self.command, self.path, error)
        self.close_connection = True
      except Exception as error:  # noqa: BLE001 (the one place that turns any failure into an answer)
        logger.exception('coars_jax server: %s %s failed', self.command, self.path)
        self.close_connection = True
        self._refuse(
          RequestError(
            500,
            f'the server failed on this request ({type(error).__name__}: {str(error)[:200]}); it is still up',
            kind='server_error',
          )
        )

    def _refuse(self, error: RequestError) -> None:
      try:
        self._error(error)
        if self.unread_body:
          self._discard_sent_body()
      except OSError as lost:  # the client is gone; nothing is left to answer
        logger.info('coars_jax server: %s %s: connection lost (%s)', self.command, self.path, lost)
        self.close_connection = True

    def do_GET(self):  # noqa: N802 (http.server's name)
      self._guarded(self._get)

    def _get(self):
      if self._route() == '/v1/chat/completions':
        raise RequestError(405, 'use POST for /v1/chat/completions')
      if self._route() != '/v1/models':
        raise RequestError(404, f'no route {_shown(self.path)}; try GET /v1/models or POST /v1/chat/completions')
      self._send(200, {'object': 'list', 'data': [{'id': i, 'object': 'model', 'owned_by': 'coars_jax'} for i in ids]})

    def do_POST(self):  # noqa: N802
      self._guarded(self._post)

    def _refuse_other_methods(self):
      self._guarded(
        lambda: _raise(
          RequestError(405, f'{self.command} is not served; use GET /v1/models or POST /v1/chat/completions')
        )
      )

    do_PUT = do_DELETE = do_PATCH = _refuse_other_methods  # noqa: N815

    def _body(self) -> bytes:
      """The request body, read only when its declared length is within `max_body_bytes`."""
      declared = self.headers.get_all('Content-Length') or []
      if self.headers.get('Transfer-Encoding') or not declared:
        raise RequestError(
          411, 'send the body with a Content-Length header (chunked bodies are not read)', param='Content-Length'
        )
      if len(set(declared)) > 1 or not declared[0].strip().isdigit():
        raise RequestError(
          400, f'Content-Length must be one non-negative integer, found {declared}', param='Content-Length'
        )
      length = int(declared[0])
      if length > max_body_bytes:
        raise RequestError(
          413,
          f"the body (Content-Length {length}) is over this server's limit of {max_body_bytes} bytes; it was not read",
          param='Content-Length',
          code='request_too_large',
        )
      self.unread_body = False
      try:
        raw = self.rfile.read(length)
      except TimeoutError:
        self.close_connection = True
        raise RequestError(408, f'the body ({length} bytes) did not arrive within {timeout} s') from None
      if len(raw) < length:
        self.close_connection = True
        raise RequestError(400, f'the body ended after {len(raw)} of its {length} bytes', param='Content-Length')
      return raw

    def _discard_sent_body(self) -> None:
      """After the refusal is sent, drops (never keeps) what the client goes on sending of its body, up to
      `DRAIN_LIMIT` bytes and until a pause: closing a socket with unread data resets the connection, and a client
      still sending would lose the answer."""
      self.close_connection = True
      self.connection.settimeout(0.2)
      try:
        dropped = 0
        while dropped < DRAIN_LIMIT:
          chunk = self.connection.recv(65536)
          if not chunk:
            break
          dropped += len(chunk)
      except OSError:
        pass  # a pause (timeout) or a reset both end the drain
      finally:
        self.connection.settimeout(timeout)

    def _post(self):
      self.unread_body = True
      route = self._route()
      if route == '/v1/models':
        raise RequestError(405, 'use GET for /v1/models')
      if route != '/v1/chat/completions':
        raise RequestError(404, f'no route {_shown(self.path)}; try POST /v1/chat/completions')
      if not pending.acquire(blocking=False):
        raise RequestError(
          503, f'{max_pending} requests are already waiting; retry later', kind='server_error', code='server_busy'
        )
      try:
        request = parse_chat_request(self._body(), model_ids=ids, max_new_tokens=max_new_tokens)
        self._send(200, complete(request))
      finally:
        pending.release()

  server = _ChatServer((host, port), Handler)
  server.backends, server.dialogues = backends, dialogue_slots
  return server
