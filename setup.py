"""coars_jax: CoARS (arXiv:2604.10029) co-evolving agentic recommender training in JAX/Flax."""

from setuptools import find_packages, setup

# Exact pins: every number in BUILD_NOTES.md was measured with these versions (see its "Pinned versions").
INSTALL_REQUIRES = [
  'jax==0.10.2',
  'jaxlib==0.10.2',
  'flax==0.12.8',
  'optax==0.2.8',
  'orbax-checkpoint==0.12.8',
  'chex==0.1.92',
  'transformers==5.24.0',
  'sentencepiece==0.2.3',
  'safetensors==0.8.0',
  'absl-py==2.5.1',
  'ml_collections==1.1.0',
  'jinja2==3.1.6',
  'numpy==2.4.6',
  'pandas==3.1.1',
  'platformdirs==4.14.8',
  'tqdm==4.70.1',
  'tensorboardX==2.6.5',
  'matplotlib==3.11.2',  # experiments/report.py's learning curves (Agg backend, no display)
]

EXTRAS_REQUIRE = {
  'cpu': [],
  'cuda12': ['jax[cuda12]==0.10.2'],
  'tpu': ['jax[tpu]==0.10.2'],
  'dev': ['pytest==9.2.0', 'pytest-xdist==3.8.0', 'hypothesis==6.170.17', 'ruff==0.17.6'],
  # torch only for parity tests against transformers; 2.13.0 is the CPU wheel the project tests with.
  # accelerate: transformers needs it to read GGUF files for the SmolLM2 parity test.
  'parity': ['torch==2.13.0', 'gguf==0.19.0', 'accelerate==1.15.0', 'peft==0.18.0'],
}

setup(
  name='coars_jax',
  version='0.1.0',
  description='CoARS: self-distilled RL for co-evolving agentic recommender systems, in JAX/Flax',
  long_description=open('README.md', encoding='utf-8').read(),
  long_description_content_type='text/markdown',
  packages=find_packages(include=['coars_jax', 'coars_jax.*', 'experiments']),
  # Each works from any directory: a relative --config path that does not exist there is read from the repository
  # (an editable install, `pip install -e .`); outputs go under the working directory, printed as absolute paths.
  entry_points={
    'console_scripts': [
      'coars-train=experiments.train:entry',
      'coars-evaluate=experiments.evaluate:entry',
      'coars-report=experiments.report:entry',
      'coars-describe-data=experiments.describe_data:entry',
      'coars-plan-memory=experiments.plan_memory:entry',
      'coars-run-table=experiments.run_table:entry',
      'coars-view=experiments.view:entry',
      'coars-serve=experiments.serve:entry',
      'coars-export-adapters=experiments.export_adapters:entry',
    ]
  },
  python_requires='>=3.10',
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS_REQUIRE,
  license='Apache-2.0',
)
