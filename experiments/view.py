"""The trajectory and credit viewer: `python -m experiments.view --input=<run folder | record folder | file.jsonl>
[--output=view.html]` writes one static HTML page (no server needed; open it in a browser).

A training run's folder gives every `trajectories/iteration_*.jsonl` sample its training wrote at each evaluation,
with the token credit A on every token, so the page shows how the credit changes over training; a rollout record
folder or any episodes JSONL works too (without A when the records carry none).
"""

import pathlib

from absl import flags

from coars_jax.eval import viewer
from experiments import cli

_INPUT = flags.DEFINE_string('input', None, 'A training run folder, a rollout record folder or an episodes JSONL.')
_OUTPUT = flags.DEFINE_string('output', '', 'The HTML file to write (default: <input folder>/view.html).')
_TITLE = flags.DEFINE_string('title', '', "The page title (default: the input's name).")
_LIMIT = flags.DEFINE_integer('limit', 500, 'At most this many dialogues (the latest iterations first kept).')


def main(argv):
  del argv
  source = pathlib.Path(_INPUT.value)
  try:
    records = viewer.load(source)
  except (FileNotFoundError, ValueError) as error:
    cli.fail(str(error))
  if len(records) > _LIMIT.value:
    records = records[-_LIMIT.value :]
  default = (source if source.is_dir() else source.parent) / 'view.html'
  output = pathlib.Path(_OUTPUT.value or default).absolute()
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(
    viewer.render_html(records, title=_TITLE.value or f'CoARS dialogues: {source.name}'), encoding='utf-8'
  )
  print(f'Wrote {output} ({len(records)} dialogues); open it in a browser')


def entry():
  """The `coars-view` console script (setup.py)."""
  cli.run(main, required=('input',))


if __name__ == '__main__':
  entry()
