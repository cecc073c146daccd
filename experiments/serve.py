"""The project's sampler as an OpenAI-compatible endpoint: `python -m experiments.serve [--model=smollm2-135m]
[--checkpoint=<adapters folder>] [--port=8000]`.

Serves `GET /v1/models` and `POST /v1/chat/completions` on 127.0.0.1 (by default): model '<name>' is the base,
'<name>:recommender' and '<name>:user' the checkpoint's adapters (a warm start, or an RL run's `final/` or
`best/`). Another tool, or `experiments.evaluate` with `backend.kind='openai'`, can then talk to a trained agent.
One request is generated at a time; temperature 0 is greedy. Every request is checked first and a bad one gets an
OpenAI-style JSON error (400 naming the field, 404, 405, 408, 411, 413, 503; 500 for a failure, the server stays
up): see `coars_jax.agents.openai_api.make_server`. Stop it with Ctrl-C.
"""

from absl import flags

from coars_jax.agents.openai_api import make_server
from coars_jax.eval import experiment as agentic_experiment
from coars_jax.sampling import LengthBuckets
from experiments import cli

_MODEL = flags.DEFINE_string('model', 'smollm2-135m', 'The backbone: a preset name or an HF checkpoint folder.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', '', "A folder with both agents' adapters ('' serves the base).")
_DATA_ROOT = flags.DEFINE_string('data_root', '', "Where the backbone's files live (default $COARS_DATA_DIR).")
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'The address to listen on (loopback by default).')
_PORT = flags.DEFINE_integer('port', 8000, 'The port.')
_NAME = flags.DEFINE_string('name', '', "The model id prefix (default: the backbone's label).")
_MAX_NEW_TOKENS = flags.DEFINE_integer(
  'max_new_tokens', 256, "The cap on a request's max_tokens (at most the largest completion bucket, 256)."
)
_MAX_BODY_BYTES = flags.DEFINE_integer('max_body_bytes', 1 << 20, 'Larger request bodies get 413, unread.')
_MAX_PENDING = flags.DEFINE_integer('max_pending', 64, 'Requests beyond this many waiting get 503 (retryable).')


def main(argv):
  del argv
  config = agentic_experiment.default_config()
  config.model, config.checkpoint, config.data_root = _MODEL.value, _CHECKPOINT.value, _DATA_ROOT.value
  agentic_experiment.validate(config)
  model, tokenizer, _ = agentic_experiment.load_agents(config)
  name = _NAME.value or agentic_experiment.model_label(config)
  server = make_server(
    model,
    tokenizer,
    name=name,
    host=_HOST.value,
    port=_PORT.value,
    max_new_tokens=_MAX_NEW_TOKENS.value,
    max_body_bytes=_MAX_BODY_BYTES.value,
    max_pending=_MAX_PENDING.value,
    buckets=LengthBuckets(prompt=(512, 1024, 2048), completion=(64, 128, 256)),
  )
  host, port = server.server_address[:2]
  models = [name] + [f'{name}:{adapter}' for adapter in model.adapter_names]
  print(f'Serving {models} at http://{host}:{port}/v1 (chat completions); Ctrl-C stops', flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


def entry():
  """The `coars-serve` console script (setup.py)."""
  cli.run(main)


if __name__ == '__main__':
  entry()
