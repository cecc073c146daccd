"""The OpenAI-compatible API both ways, over loopback: the client plays a full evaluation (episodes and user F1)
against the project's own server and gets the in-process backend's rows (greedy); a rerun is served from the cache;
transient failures are retried and permanent ones named."""

import http.server
import json
import threading
import urllib.request

import pytest

from coars_jax.agents.episodes import LLMBackend, LLMBackendConfig, RolloutConfig
from coars_jax.agents.openai_api import APIError, OpenAIBackend, OpenAIConfig, make_server
from coars_jax.data import user_sim_set
from coars_jax.data.user_sim import UserSimSet
from coars_jax.eval.agentic import AgenticEvalConfig, evaluate_agentic
from coars_jax.eval.user_f1 import UserF1Config
from coars_jax.sampling import GREEDY
from tests.training.test_rl import BUCKETS, micro_model
from tests.training.test_warm_start import DATASET, micro_sasrec, small_tokenizer

TOKENS = 16
EVAL = AgenticEvalConfig(
  split='test',
  window_indices=(0, 1, 2),
  batch_size=4,
  rollout=RolloutConfig(max_turns=2),
  user_f1=UserF1Config(batch_size=8),
)
KEYS = ('hit@1', 'valid_ratio', 'avg_turns', 'user_f1', 'user_precision', 'user_recall', 'click_rate')


def serve(server):
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  return f'http://127.0.0.1:{server.server_address[1]}/v1'


@pytest.fixture(scope='module')
def setting():
  model, tokenizer, sasrec = micro_model(), small_tokenizer(), micro_sasrec()
  full = user_sim_set(DATASET)
  sim = UserSimSet(dataset=full.dataset, cases=full.cases[:2], users_left_out=0)
  server = make_server(model, tokenizer, name='micro', port=0, max_new_tokens=TOKENS, buckets=BUCKETS)
  url = serve(server)
  yield model, tokenizer, sasrec, sim, url
  server.shutdown()


def client(url, cache_dir='', **fields):
  return OpenAIBackend(
    OpenAIConfig(
      base_url=url,
      models={'recommender': 'micro:recommender', 'user': 'micro:user'},
      max_tokens={'recommender': TOKENS, 'user': TOKENS},
      cache_dir=str(cache_dir),
      **fields,
    )
  )


def test_models_are_listed(setting):
  *_, url = setting
  with urllib.request.urlopen(url + '/models', timeout=30) as response:
    ids = [m['id'] for m in json.loads(response.read())['data']]
  assert ids == ['micro', 'micro:recommender', 'micro:user']


def test_loopback_evaluation_equals_the_in_process_rows_and_reruns_from_the_cache(setting, tmp_path):
  model, tokenizer, sasrec, sim, url = setting
  local = LLMBackend(
    model,
    tokenizer,
    adapters={'recommender': 'recommender', 'user': 'user'},
    config=LLMBackendConfig(
      recommender_max_new_tokens=TOKENS, user_max_new_tokens=TOKENS, sampling=GREEDY, buckets=BUCKETS
    ),
  )
  expected = evaluate_agentic(DATASET, local, peer=sasrec, method='m', model='micro', config=EVAL, user_sim=sim)
  remote = client(url, tmp_path / 'cache')
  found = evaluate_agentic(DATASET, remote, peer=sasrec, method='m', model='micro', config=EVAL, user_sim=sim)
  for key in KEYS:
    assert found.row[key] == expected.row[key], key
  texts = lambda result: [(t.recommender.text, t.user.text) for e in result.episodes for t in e.turns]  # noqa: E731
  assert texts(found) == texts(expected)
  sent = remote.usage['requests']
  assert sent > 0 and remote.usage['cached'] == 0 and remote.usage['prompt_tokens'] > 0
  assert remote.usage['completion_tokens'] > 0 and remote.usage['cost_usd'] == 0.0
  # A rerun with the same requests reads every answer from the cache: nothing is sent.
  again = client(url, tmp_path / 'cache')
  rerun = evaluate_agentic(DATASET, again, peer=sasrec, method='m', model='micro', config=EVAL, user_sim=sim)
  assert again.usage['requests'] == 0 and again.usage['cached'] == sent
  assert rerun.row['hit@1'] == expected.row['hit@1'] and rerun.row['user_f1'] == expected.row['user_f1']


def test_unknown_model_is_a_named_error(setting):
  *_, url = setting
  backend = OpenAIBackend(
    OpenAIConfig(base_url=url, models={'recommender': 'nope', 'user': 'micro:user'}, max_retries=0)
  )
  with pytest.raises(APIError, match="HTTP 404 for model 'nope'"):
    backend.generate('recommender', [[{'role': 'user', 'content': 'hi'}]], seed=0, episode_ids=[0], turn=1)


def test_transient_failures_are_retried():
  calls = []

  class Flaky(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
      del args

    def do_POST(self):  # noqa: N802
      self.rfile.read(int(self.headers['Content-Length']))
      calls.append(self.path)
      status = 503 if len(calls) < 3 else 200
      body = json.dumps(
        {
          'choices': [{'message': {'content': 'Reason: r\nItem: x'}, 'finish_reason': 'stop'}],
          'usage': {'prompt_tokens': 10, 'completion_tokens': 5},
        }
      ).encode()
      self.send_response(status)
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      self.wfile.write(body)

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Flaky)
  url = serve(server)
  try:
    backend = client(url, backoff=0.01, price_per_1k_prompt_tokens=1.0, price_per_1k_completion_tokens=2.0)
    out = backend.generate('recommender', [[{'role': 'user', 'content': 'hi'}]], seed=0, episode_ids=[0], turn=1)
    assert out[0].text == 'Reason: r\nItem: x' and out[0].finished
    assert len(calls) == 3 and backend.usage['retries'] == 2 and backend.usage['requests'] == 1
    assert backend.usage['cost_usd'] == pytest.approx((10 * 1.0 + 5 * 2.0) / 1000)
    failing = client(url, backoff=0.01, max_retries=0)
    calls.clear()
    with pytest.raises(APIError, match='HTTP 503'):
      failing.generate('user', [[{'role': 'user', 'content': 'hi'}]], seed=0, episode_ids=[0], turn=1)
  finally:
    server.shutdown()


def test_evaluation_config_validates_the_api_backend():
  from coars_jax import configlib
  from coars_jax.eval import experiment as agentic_experiment

  config = agentic_experiment.default_config()
  config.backend.kind = 'openai'
  with pytest.raises(configlib.ConfigError, match="Config group 'backend': OpenAIConfig.base_url must be"):
    agentic_experiment.validate(config)
  config.backend.update(base_url='http://127.0.0.1:8000/v1', recommender_model='m:recommender', user_model='m:user')
  agentic_experiment.validate(config)
  assert agentic_experiment.model_label(config) == 'api:m:recommender+m:user'
  config.constrained = True
  with pytest.raises(configlib.ConfigError, match="Config field 'constrained': expected False with backend.kind"):
    agentic_experiment.validate(config)
  config.constrained = False
  config.backend.api_key_env = 'COARS_TEST_SURELY_UNSET_KEY'
  with pytest.raises(configlib.ConfigError, match='COARS_TEST_SURELY_UNSET_KEY'):
    agentic_experiment.validate(config)
