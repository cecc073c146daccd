"""The OpenAI-compatible server under bad requests, over loopback: each kind of bad request gets its status and an
OpenAI-style error naming the field, without compiling or keeping anything; an unexpected failure is a 500 and the
server stays up; a good request then gets the same answer as before, and 8 at once all get theirs."""

import concurrent.futures
import dataclasses
import http.client
import json
import threading
import time

import pytest

from coars_jax.agents.episodes import LLMBackend
from coars_jax.agents.openai_api import SAMPLING_STEP, make_server, parse_chat_request
from coars_jax.sampling import count_backend_compiles
from tests.agents.test_openai_api import TOKENS
from tests.training.test_rl import BUCKETS, micro_model
from tests.training.test_warm_start import small_tokenizer

MAX_BODY = 64 * 1024
MAX_BACKENDS = 3
MAX_DIALOGUES = 4
TIMEOUT = 2.0
CHAT = '/v1/chat/completions'
GOOD = {
  'model': 'micro:user',
  'messages': [{'role': 'system', 'content': 'You pick items.'}, {'role': 'user', 'content': 'Pick one item.'}],
  'max_tokens': TOKENS,
  'temperature': 0.0,
  'seed': 3,
}


@pytest.fixture(scope='module')
def server():
  served = make_server(
    micro_model(),
    small_tokenizer(),
    name='micro',
    port=0,
    max_new_tokens=TOKENS,
    buckets=BUCKETS,
    max_body_bytes=MAX_BODY,
    max_backends=MAX_BACKENDS,
    max_dialogues=MAX_DIALOGUES,
    timeout=TIMEOUT,
  )
  thread = threading.Thread(target=served.serve_forever, daemon=True)
  thread.start()
  served.thread = thread
  yield served
  served.shutdown()
  served.server_close()


def send(server, method='POST', path=CHAT, body=b'', headers=None, length=True):
  """(status, JSON answer) of one raw request; `body` may be a dict (sent as JSON) or bytes, sent as they are."""
  raw = json.dumps(body).encode() if isinstance(body, dict) else body
  connection = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=30)
  try:
    connection.putrequest(method, path)
    if length:
      connection.putheader('Content-Length', str(len(raw)))
    for key, value in (headers or {}).items():
      connection.putheader(key, value)
    connection.endheaders(raw or None)
    response = connection.getresponse()
    assert response.getheader('Content-Type') == 'application/json'
    return response.status, json.loads(response.read())
  finally:
    connection.close()


def answer(server, body):
  status, value = send(server, body=body)
  assert status == 200, value
  return {key: value[key] for key in ('id', 'model', 'choices', 'usage')}  # all but the clock


def changed(**fields):
  return {**GOOD, **fields}


def without(field):
  return {key: value for key, value in GOOD.items() if key != field}


def message(**fields):
  return changed(messages=[{'role': 'user', 'content': 'hi', **fields}])


@dataclasses.dataclass(frozen=True)
class Bad:
  """A bad request and what it must get: the status, the error's param (the field) and a part of its message."""

  name: str
  status: int
  param: str | None
  says: str
  body: object = None
  method: str = 'POST'
  path: str = CHAT
  headers: dict | None = None
  length: bool = True


BAD = [
  # The body as a whole.
  Bad('truncated JSON', 400, 'body', 'JSON', b'{"model": '),
  Bad('empty body', 400, 'body', 'JSON', b''),
  Bad('not UTF-8', 400, 'body', 'UTF-8', b'\xff\xfe{}'),
  Bad('NaN is not JSON', 400, 'body', 'NaN', json.dumps(changed(temperature=float('nan'))).encode()),
  Bad('deep nesting', 400, 'body', 'JSON', b'[' * 50_000),
  Bad('an array', 400, 'body', 'JSON object', b'[1, 2]'),
  Bad('unknown field', 400, 'frobnicate', 'frobnicate', changed(frobnicate=1)),
  # model
  Bad('no model', 400, 'model', 'model', without('model')),
  Bad('model not a string', 400, 'model', 'model', changed(model=42)),
  Bad('unknown model', 404, 'model', "'nope' is not served", changed(model='nope')),
  # messages
  Bad('no messages', 400, 'messages', 'messages', without('messages')),
  Bad('messages a string', 400, 'messages', 'messages', changed(messages='hi')),
  Bad('messages empty', 400, 'messages', 'non-empty', changed(messages=[])),
  Bad('message a string', 400, 'messages[0]', 'messages[0]', changed(messages=['hi'])),
  Bad('no role', 400, 'messages[0].role', 'messages[0].role', changed(messages=[{'content': 'hi'}])),
  Bad('role tool', 400, 'messages[0].role', "'tool'", message(role='tool')),
  Bad('role developer', 400, 'messages[0].role', 'messages[0].role', message(role='developer')),
  Bad('role not a string', 400, 'messages[0].role', 'messages[0].role', message(role=['user'])),
  Bad('content a number', 400, 'messages[0].content', 'messages[0].content', message(content=7)),
  Bad('content null', 400, 'messages[0].content', 'messages[0].content', message(content=None)),
  Bad(
    'content parts',
    400,
    'messages[1].content',
    'messages[1].content',
    changed(messages=[GOOD['messages'][0], {'role': 'user', 'content': [{'type': 'text', 'text': 'hi'}]}]),
  ),
  Bad('tool calls', 400, 'messages[0].tool_calls', 'messages[0].tool_calls', message(tool_calls=[])),
  Bad('name not a string', 400, 'messages[0].name', 'messages[0].name', message(name=3)),
  Bad('lone surrogate', 400, 'messages', 'messages', message(content='\ud800')),
  Bad(
    'prompt too long', 400, 'messages', f'limit of {BUCKETS.prompt[-1]} tokens', message(content='hello world ' * 600)
  ),
  # sampling
  Bad('temperature negative', 400, 'temperature', 'temperature', changed(temperature=-0.1)),
  Bad('temperature over 2', 400, 'temperature', 'temperature', changed(temperature=2.5)),
  Bad('temperature a string', 400, 'temperature', 'temperature', changed(temperature='0.5')),
  Bad('temperature a bool', 400, 'temperature', 'temperature', changed(temperature=True)),
  Bad(
    'temperature infinite',
    400,
    'temperature',
    'temperature',
    json.dumps(GOOD).replace('"temperature": 0.0', '"temperature": 1e999').encode(),
  ),
  Bad('top_p zero', 400, 'top_p', 'top_p', changed(top_p=0)),
  Bad('top_p over 1', 400, 'top_p', 'top_p', changed(top_p=1.5)),
  Bad('top_p a string', 400, 'top_p', 'top_p', changed(top_p='high')),
  Bad('max_tokens zero', 400, 'max_tokens', 'max_tokens', changed(max_tokens=0)),
  Bad('max_tokens negative', 400, 'max_tokens', 'max_tokens', changed(max_tokens=-5)),
  Bad('max_tokens a float', 400, 'max_tokens', 'max_tokens', changed(max_tokens=8.0)),
  Bad('max_tokens a bool', 400, 'max_tokens', 'max_tokens', changed(max_tokens=True)),
  Bad('max_tokens a string', 400, 'max_tokens', 'max_tokens', changed(max_tokens='8')),
  Bad(
    'max_completion_tokens zero',
    400,
    'max_completion_tokens',
    'max_completion_tokens',
    changed(max_completion_tokens=0),
  ),
  Bad('budgets disagree', 400, 'max_completion_tokens', 'disagree', changed(max_tokens=4, max_completion_tokens=8)),
  Bad('seed a bool', 400, 'seed', 'seed', changed(seed=False)),
  Bad('seed a float', 400, 'seed', 'seed', changed(seed=1.5)),
  Bad('seed past 64 bits', 400, 'seed', 'seed', changed(seed=2**64)),
  Bad('seed a string', 400, 'seed', 'seed', changed(seed='7')),
  # OpenAI fields this server has no feature for
  Bad('n 2', 400, 'n', 'n must be 1', changed(n=2)),
  Bad('n a bool', 400, 'n', 'n must be 1', changed(n=True)),
  Bad('stream', 400, 'stream', 'stream must be false', changed(stream=True)),
  Bad('stop', 400, 'stop', 'stop', changed(stop=['\n'])),
  Bad('logprobs', 400, 'logprobs', 'logprobs', changed(logprobs=True)),
  Bad('tools', 400, 'tools', 'tools', changed(tools=[{'type': 'function', 'function': {'name': 'f'}}])),
  Bad('json mode', 400, 'response_format', 'response_format', changed(response_format={'type': 'json_object'})),
  Bad('penalty', 400, 'presence_penalty', 'presence_penalty', changed(presence_penalty=0.5)),
  # Transport
  Bad('body over the limit', 413, 'Content-Length', f'limit of {MAX_BODY}', message(content='x' * MAX_BODY)),
  Bad(
    'huge Content-Length, body never sent',
    413,
    'Content-Length',
    f'limit of {MAX_BODY}',
    b'',
    headers={'Content-Length': str(10**12)},
    length=False,
  ),
  Bad('no Content-Length', 411, 'Content-Length', 'Content-Length', b'', length=False),
  Bad('chunked', 411, 'Content-Length', 'chunked', b'', headers={'Transfer-Encoding': 'chunked'}, length=False),
  Bad(
    'Content-Length not a number',
    400,
    'Content-Length',
    'Content-Length',
    b'',
    headers={'Content-Length': 'ten'},
    length=False,
  ),
  Bad('wrong route', 404, None, 'no route', GOOD, path='/v1/completions'),
  Bad('GET the chat route', 405, None, 'POST', b'', method='GET'),
  Bad('POST the models route', 405, None, 'GET', GOOD, path='/v1/models'),
  Bad('PUT', 405, None, 'PUT', GOOD, method='PUT'),
  Bad('DELETE', 405, None, 'DELETE', b'', method='DELETE'),
]


def check_refusal(server, case: Bad):
  started = time.monotonic()
  status, value = send(
    server, method=case.method, path=case.path, body=case.body, headers=case.headers, length=case.length
  )
  assert status == case.status, (case.name, value)
  error = value['error']
  assert set(error) == {'message', 'type', 'param', 'code'} and error['type'] == 'invalid_request_error', case.name
  assert error['param'] == case.param and case.says in error['message'], (case.name, error)
  if case.param and case.param != 'body':
    assert case.param in error['message'], (case.name, error)
  # Nothing waits for a body that was refused (the server's read timeout would show here).
  assert time.monotonic() - started < TIMEOUT, case.name


@pytest.mark.parametrize('case', BAD, ids=[case.name for case in BAD])
def test_each_bad_request_gets_its_status_and_names_the_field(server, case):
  check_refusal(server, case)


def test_bad_requests_change_nothing_and_compile_nothing(server):
  assert len(BAD) >= 30
  before = answer(server, GOOD)
  assert before['choices'][0]['message']['content'] and before['usage']['completion_tokens'] > 0
  with count_backend_compiles() as compiles:
    for case in BAD:
      check_refusal(server, case)
  assert compiles.count == 0  # every refusal came before any work
  assert answer(server, GOOD) == before
  assert server.thread.is_alive()
  status, models = send(server, method='GET', path='/v1/models')
  assert status == 200 and [m['id'] for m in models['data']] == ['micro', 'micro:recommender', 'micro:user']


def test_common_openai_fields_are_accepted_at_their_neutral_values(server):
  expected = answer(server, GOOD)
  neutral = changed(
    stream=False,
    n=1,
    stop=None,
    user='someone',
    response_format={'type': 'text'},
    logprobs=False,
    frequency_penalty=0,
    presence_penalty=0.0,
    tools=[],
    parallel_tool_calls=True,
    logit_bias={},
    stream_options=None,
    top_logprobs=0,
    tool_choice='none',
    messages=[{**m, 'name': 'x'} for m in GOOD['messages']],
  )
  assert answer(server, neutral) == expected
  # Greedy decoding ignores top_p; the newer budget name means the same as the older one.
  assert answer(server, changed(top_p=0.3)) == expected
  assert answer(server, {**without('max_tokens'), 'max_completion_tokens': TOKENS}) == expected


def test_budgets_are_capped_and_sampling_is_on_a_grid_so_requests_compile_no_new_shape(server):
  expected = answer(server, GOOD)
  with count_backend_compiles() as compiles:
    capped = answer(server, changed(max_tokens=10**30))  # served at the cap, in the same bucket
    shorter = answer(server, changed(max_tokens=3))  # a traced count inside the same completion bucket
  assert compiles.count == 0 and capped == expected
  assert shorter['usage']['completion_tokens'] <= 3
  sampled = answer(server, changed(temperature=0.7, top_p=0.9, seed=11))
  with count_backend_compiles() as compiles:
    # Within half a step of the same grid point: the same compiled program and, with the same seed, the same text.
    nearby = answer(server, changed(temperature=0.7 + SAMPLING_STEP / 3, top_p=0.9 - SAMPLING_STEP / 3, seed=11))
  assert compiles.count == 0 and nearby == sampled


def test_backends_are_kept_in_a_bounded_lru_with_no_per_request_state(server):
  for max_tokens in range(1, 2 * MAX_BACKENDS + 2):
    answer(server, changed(max_tokens=max_tokens))
  assert len(server.backends) == MAX_BACKENDS
  assert [key[1] for key in server.backends] == list(range(MAX_BACKENDS + 2, 2 * MAX_BACKENDS + 2))
  assert all(not backend.calls for backend in server.backends.values())


def test_conversations_are_kept_in_a_bounded_lru(server):
  first = answer(server, GOOD)
  reply = {'role': 'assistant', 'content': first['choices'][0]['message']['content']}
  follow_up = changed(messages=GOOD['messages'] + [reply, {'role': 'user', 'content': 'Another one.'}])
  assert answer(server, follow_up)['usage']['prompt_tokens'] > first['usage']['prompt_tokens']
  for seed in range(2 * MAX_DIALOGUES):
    answer(server, changed(seed=seed, messages=[{'role': 'user', 'content': f'Item {seed}?'}]))
  assert len(server.dialogues) == MAX_DIALOGUES
  assert sorted(server.dialogues.values()) == list(range(MAX_DIALOGUES))  # each slot holds one conversation


def test_eight_concurrent_requests_all_get_their_answers(server):
  bodies = [changed(seed=seed, messages=[{'role': 'user', 'content': f'Pick item {seed}.'}]) for seed in range(8)]
  sequential = [answer(server, body) for body in bodies]
  with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    concurrent_answers = list(pool.map(lambda body: answer(server, body), bodies))
  assert concurrent_answers == sequential


def test_an_unexpected_failure_is_a_500_and_the_server_stays_up(server, monkeypatch):
  expected = answer(server, GOOD)
  generate = LLMBackend.generate

  def failing(self, agent, prompts, **kwargs):
    if any('BOOM' in m['content'] for m in prompts[0]):
      raise RuntimeError('an injected failure')
    return generate(self, agent, prompts, **kwargs)

  monkeypatch.setattr(LLMBackend, 'generate', failing)
  status, value = send(server, body=message(content='BOOM'))
  assert status == 500 and value['error']['type'] == 'server_error'
  assert 'RuntimeError: an injected failure' in value['error']['message']
  assert server.thread.is_alive() and answer(server, GOOD) == expected


def test_a_body_that_never_arrives_times_out_with_408(server):
  connection = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=30)
  try:
    connection.putrequest('POST', CHAT)
    connection.putheader('Content-Length', '100')
    connection.endheaders(b'{"model": ')  # and then silence
    response = connection.getresponse()
    assert response.status == 408 and 'did not arrive' in json.loads(response.read())['error']['message']
  finally:
    connection.close()
  assert server.thread.is_alive()


def test_requests_past_the_pending_limit_get_503(monkeypatch):
  busy = make_server(
    micro_model(), small_tokenizer(), name='micro', port=0, max_new_tokens=TOKENS, buckets=BUCKETS, max_pending=1
  )
  threading.Thread(target=busy.serve_forever, daemon=True).start()
  entered, release = threading.Event(), threading.Event()
  generate = LLMBackend.generate

  def held(self, *args, **kwargs):
    entered.set()
    release.wait(30)
    return generate(self, *args, **kwargs)

  monkeypatch.setattr(LLMBackend, 'generate', held)
  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      first = pool.submit(send, busy, body=GOOD)
      assert entered.wait(30)
      status, value = send(busy, body=GOOD)
      assert status == 503 and value['error']['code'] == 'server_busy'
      release.set()
      assert first.result()[0] == 200
    assert send(busy, body=GOOD)[0] == 200  # the slot is free again
  finally:
    release.set()
    busy.shutdown()
    busy.server_close()


def test_server_settings_are_checked():
  with pytest.raises(ValueError, match=r'max_new_tokens must be an int in \[1, 16\]'):
    make_server(micro_model(), small_tokenizer(), name='micro', port=0, max_new_tokens=17, buckets=BUCKETS)
  with pytest.raises(ValueError, match='max_body_bytes must be a positive int'):
    make_server(
      micro_model(), small_tokenizer(), name='micro', port=0, max_new_tokens=8, buckets=BUCKETS, max_body_bytes=0
    )


def test_parse_chat_request_rounds_sampling_to_the_grid():
  parsed = parse_chat_request(
    json.dumps(changed(temperature=0.73, top_p=0.01, max_tokens=999)).encode(),
    model_ids=['micro:user'],
    max_new_tokens=TOKENS,
  )
  assert (parsed.temperature, parsed.top_p, parsed.max_tokens, parsed.adapter) == (0.75, SAMPLING_STEP, TOKENS, 'user')
  greedy = parse_chat_request(
    json.dumps(changed(temperature=0.01, top_p=0.5)).encode(), model_ids=['micro:user'], max_new_tokens=TOKENS
  )
  assert (greedy.temperature, greedy.top_p) == (0.0, 1.0)
