"""The server side's request schema for `/v1/chat/completions`: the roles, fields and sampling grid it serves
(`ROLES`, `SAMPLING_STEP`, `MAX_TEMPERATURE`, `SEED_RANGE`, `NEUTRAL_FIELDS`, `SAMPLING_FIELDS`, `KNOWN_FIELDS`,
`MESSAGE_FIELDS`), `RequestError` (a refusal with its HTTP status and OpenAI's error body), `ChatRequest` (a checked
request) and `parse_chat_request`, which checks every field of a raw body for type, range and allowed values before
any work and rounds the sampling onto the grid, so that no request can compile a new decode program. It does no
HTTP; `agents.openai_server` uses it, and `agents.openai_api` re-exports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Sequence

from coars_jax.agents.prompts import Message

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
SAMPLING_FIELDS = ('max_tokens', 'max_completion_tokens', 'temperature', 'top_p', 'seed')
KNOWN_FIELDS = ('model', 'messages') + SAMPLING_FIELDS + tuple(NEUTRAL_FIELDS)
MESSAGE_FIELDS = ('role', 'content', 'name')  # 'name' labels a participant; the chat template ignores it


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
