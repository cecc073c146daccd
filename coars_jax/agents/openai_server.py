"""The HTTP server of the OpenAI-compatible API: `make_server` puts the project's own sampler behind `/v1/models` and
`/v1/chat/completions` on a local port (the base model and each LoRA adapter as its own model id), with an LRU of
`LLMBackend`s per adapter and sampling setting, an LRU of kept conversations so that a continued dialogue is encoded
as the in-process backend encodes its next turn, and a request handler that reads bodies within limits and answers
every refusal or failure with an OpenAI-style JSON error (`agents.openai_schema` checks the requests). Only
http.server speaks HTTP here; `agents.openai_api` re-exports `make_server`.
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import logging
import threading
import time
import urllib.parse
from typing import Any, Sequence

from coars_jax.agents.episodes import LLMBackend, LLMBackendConfig, encode_prompt
from coars_jax.agents.openai_schema import (
  ChatRequest,
  RequestError,
  _is_int,
  _is_number,
  _raise,
  _shown,
  parse_chat_request,
)
from coars_jax.agents.prompts import Message
from coars_jax.sampling import LengthBuckets, SamplingParams

DRAIN_LIMIT = 16 << 20  # bytes of a refused body read (64 KiB at a time) and dropped before closing

# Named as before the split, when the server lived in `agents.openai_api`: logging settings keep applying.
logger = logging.getLogger('coars_jax.agents.openai_api')


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
