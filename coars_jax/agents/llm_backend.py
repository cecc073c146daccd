"""`LLMBackend`: the agents' shared decoder behind `backend.AgentBackend`, one `sampling.generate` call per agent
per turn for all live episodes with each agent's LoRA adapter chosen per row, append-only prompts read from the
KV cache the same episode's previous call left (`LLMBackendConfig.prefix_reuse`), and the output grammars when
constrained; `generate_grouped` serves groups of standalone prompts with a common start (the user F1's
judgements) through `sampling.generate_shared_prefix`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
from jax.sharding import Mesh

from coars_jax.agents.backend import BackendCall, Generation, check_agent
from coars_jax.agents.chat_tokens import DialogueTokens
from coars_jax.agents.output_constraints import recommender_constraint, user_constraint
from coars_jax.agents.prompts import Message
from coars_jax.agents.protocol import AGENTS, USER
from coars_jax.models.lora import ADAPTERS_OFF, merge_lora
from coars_jax.models.tokenizer import end_of_turn_id, render_chat, special_token_ids
from coars_jax.parallel.distributed import fetch
from coars_jax.parallel.rules import Rules
from coars_jax.sampling import LengthBuckets, SamplingParams, generate
from coars_jax.sampling.constraints import token_classes
from coars_jax.sampling.sampler import PromptPrefix, common_prefix_length, prompt_slots
from coars_jax.sampling.shared_prefix import generate_shared_prefix


@dataclasses.dataclass(frozen=True, kw_only=True)
class LLMBackendConfig:
  """How `LLMBackend` samples the agents' messages.

  Attributes:
    recommender_max_new_tokens: the token budget of a recommender message m_rec_t.
    user_max_new_tokens: the token budget of a user message m_user_t.
    sampling: temperature / top-k / top-p (`sampling.SamplingParams`); the behaviour log-probs are under it.
    buckets: prompt and completion length buckets (`sampling.LengthBuckets`); they bound the compiled programs.
    batch_buckets: batch sizes a call is padded up to (with copies of its first prompt, whose outputs are
      dropped), so that the shrinking set of live episodes reuses compiled programs; None pads to the next power
      of two, () runs every call at its exact size.
    constrained: decode under the agents' output grammars (`agents.output_constraints`): the recommender writes
      'Reason: <line>' then 'Item: <one of its candidates' titles>', the user 'Reason: <line>', 'Action: <one
      of the four>' and 'Score: <line>', so every message parses (ValidRatio 1). The behaviour log-probs are
      then under the constrained distribution, so a trainer must rescore with the same constraint
      (`sampling.score(..., constraint=)`). Off by default: the model writes freely.
    prefix_reuse: from turn 2 on, read the part of each prompt that repeats the same episode's previous prompt of
      that agent (system message, history, candidates: everything before the first token that differs) from that
      call's KV cache, and prefill only the rest (`sampling.PromptPrefix`). The outputs equal a full prefill's to
      float rounding. On by default; the cache of each agent's last call is kept until the rollout ends.
    merge_adapters: run each agent as a plain decoder with its adapter folded into the weights
      (`models.merge_lora`, made when the backend is built), so a call costs what the base model's does instead of
      adding every adapter's two products to each adapted projection. For parameters that stay fixed while the
      backend lives (evaluation, serving): later updates of the adapters do not reach the merged copies. Outputs
      equal the adapted model's to float rounding. Unsharded backends only.
  """

  recommender_max_new_tokens: int = 128
  user_max_new_tokens: int = 128
  sampling: SamplingParams = SamplingParams()
  buckets: LengthBuckets = LengthBuckets()
  batch_buckets: tuple[int, ...] | None = None
  constrained: bool = False
  prefix_reuse: bool = True
  merge_adapters: bool = False

  def __post_init__(self):
    for name in ('recommender_max_new_tokens', 'user_max_new_tokens'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'LLMBackendConfig.{name} must be a positive int, found {value!r}')
    if not isinstance(self.sampling, SamplingParams):
      raise TypeError(f'LLMBackendConfig.sampling must be a SamplingParams, found {type(self.sampling).__name__}')
    if not isinstance(self.buckets, LengthBuckets):
      raise TypeError(f'LLMBackendConfig.buckets must be a LengthBuckets, found {type(self.buckets).__name__}')
    if self.batch_buckets is not None:
      sizes = tuple(self.batch_buckets)
      if any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes) or list(sizes) != sorted(
        set(sizes)
      ):
        raise ValueError(
          f'LLMBackendConfig.batch_buckets must be None or strictly increasing positive ints, found '
          f'{self.batch_buckets!r}'
        )
      object.__setattr__(self, 'batch_buckets', sizes)
    for name in ('constrained', 'prefix_reuse', 'merge_adapters'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'LLMBackendConfig.{name} must be a bool, found {getattr(self, name)!r}')

  def max_new_tokens(self, agent: str) -> int:
    return self.recommender_max_new_tokens if check_agent(agent) == 0 else self.user_max_new_tokens

  def padded_batch(self, size: int) -> int:
    """The batch size a call of `size` prompts runs at."""
    if self.batch_buckets is None:
      return 1 << (size - 1).bit_length()
    for bucket in self.batch_buckets:
      if bucket >= size:
        return bucket
    # Beyond the largest bucket, run at the exact size rather than refuse: a bigger batch is a caller's choice.
    return size


class LLMBackend:
  """The agents' shared decoder: renders each prompt with the tokenizer's chat template, and makes ONE
  `sampling.generate` call per agent per turn for all live episodes, selecting the agent's LoRA adapter per row.

  Args:
    model: a `models.Decoder`, with LoRA adapters attached if `adapters` names any.
    tokenizer: its HF tokenizer.
    adapters: the adapter each agent runs with, by name ('recommender') or index into `model.adapter_names`;
      None (for the whole mapping or for one agent) runs the base model, as zero-shot agents do. Adapters are
      passed as a per-row int32 array, so both agents share one set of compiled programs.
    config: token budgets, sampling and buckets.
    mesh, rules: run every call's prefill and decode sharded on `mesh` by the logical-axis `rules`
      (`sampling.generate`'s arguments; rules default to `parallel.DEFAULT_RULES`), as an `RLTrainer` does with
      its own mesh so that rollouts use the arrays its update step placed. None (default) runs the unsharded
      programs. On a mesh that spans processes, every process must make the same calls; each gets every row back.
  """

  def __init__(
    self,
    model,
    tokenizer,
    *,
    adapters: Mapping[str, str | int | None] | None = None,
    config: LLMBackendConfig = LLMBackendConfig(),
    mesh: Mesh | None = None,
    rules: Rules | None = None,
  ):
    self.model, self.tokenizer, self.config = model, tokenizer, config
    self.mesh, self.rules = mesh, rules
    self.special = special_token_ids(tokenizer)
    if len(tokenizer) > model.config.vocab_size:
      raise ValueError(
        f"LLMBackend: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
        f'{model.config.vocab_size}; ids past the embedding table cannot be run'
      )
    adapters = dict(adapters or {})
    unknown = set(adapters) - set(AGENTS)
    if unknown:
      raise ValueError(f'LLMBackend: adapters has keys {sorted(unknown)}; expected agents from {AGENTS}')
    self.adapter_ids: dict[str, int | None] = {}
    for agent in AGENTS:
      choice = adapters.get(agent)
      if choice is None:
        # A model with adapters still takes an index array (all "off") so that base and adapted calls share
        # compiled programs; a model without adapters takes no adapter argument at all.
        self.adapter_ids[agent] = ADAPTERS_OFF if model.adapter_names else None
      elif not model.adapter_names:
        raise ValueError(
          f'LLMBackend: adapters[{agent!r}]={choice!r} but the model has no LoRA adapters; attach '
          f'them with models.add_lora or pass adapters=None for the base model'
        )
      elif isinstance(choice, str):
        if choice not in model.adapter_names:
          raise ValueError(
            f"LLMBackend: adapters[{agent!r}]={choice!r} is not one of the model's adapters {model.adapter_names}"
          )
        self.adapter_ids[agent] = model.adapter_names.index(choice)
      elif (
        isinstance(choice, int) and not isinstance(choice, bool) and ADAPTERS_OFF <= choice < len(model.adapter_names)
      ):
        self.adapter_ids[agent] = choice
      else:
        raise ValueError(
          f'LLMBackend: adapters[{agent!r}] must be an adapter name, an index in '
          f'[{ADAPTERS_OFF}, {len(model.adapter_names)}) or None; found {choice!r}'
        )
    # agent -> the plain decoder it runs when adapters are merged (agents with the same choice share one)
    self._merged: dict[str, Any] = {}
    if config.merge_adapters and model.adapter_names:
      if mesh is not None:
        raise ValueError('LLMBackend: merge_adapters runs unsharded only; turn it off on a mesh')
      by_choice: dict[int, Any] = {}
      for agent, index in self.adapter_ids.items():
        if index not in by_choice:
          by_choice[index] = merge_lora(model, None if index == ADAPTERS_OFF else model.adapter_names[index])
        self._merged[agent] = by_choice[index]
    self.calls: list[BackendCall] = []
    self._token_classes = None
    self.dialogues = DialogueTokens(tokenizer)
    # agent -> (cache of its last call, {episode id: (row, ids in that cache, their cache slots)})
    self._last_prompts: dict[str, tuple[Any, dict[int, tuple[int, list[int], np.ndarray]]]] = {}
    self.prefill_tokens = {'prefilled': 0, 'reused': 0}  # real prompt tokens, summed over calls

  def clear_prefixes(self) -> None:
    """Drops the kept KV caches (`LLMBackendConfig.prefix_reuse`); `run_episodes` calls it when a rollout ends, so
    no cache outlives the parameters it was computed with."""
    self._last_prompts.clear()
    self.dialogues.clear()

  def _prefix(self, agent: str, turn: int, episode_ids: Sequence[int], token_lists: list[list[int]]):
    """The `PromptPrefix` of this call from the agent's previous call (None when nothing can be reused)."""
    if not self.config.prefix_reuse or turn <= 1 or agent not in self._last_prompts:
      return None
    cache, earlier = self._last_prompts[agent]
    rows, lengths, slots = [], [], []
    for position, ids in enumerate(token_lists):
      episode = int(episode_ids[position]) if position < len(episode_ids) else int(episode_ids[0])
      row, old_ids, old_slots = earlier.get(episode, (0, [], np.zeros(0, np.int32)))
      shared = common_prefix_length(ids[: len(ids) - 1], old_ids)  # at least one token is left to prefill
      rows.append(row)
      lengths.append(shared)
      slots.append(old_slots[:shared])
    if max(lengths) == 0:
      return None
    return PromptPrefix(cache=cache, rows=np.asarray(rows, np.int32), sources=slots)

  def token_classes(self):
    """The tokenizer's free-text and line-ending token classes over the model's vocabulary, for constrained
    decoding; computed on first use (it decodes every token once)."""
    if self._token_classes is None:
      self._token_classes = token_classes(self.tokenizer, self.model.config.vocab_size)
    return self._token_classes

  def constraint(self, agent: str, batch: int, candidates: Sequence[Sequence[str]] | None):
    """The output grammar of one call padded to `batch` rows (padding rows copy row 0, as the prompts do)."""
    options = dict(
      max_new_tokens=self.config.max_new_tokens(agent),
      vocab_size=self.model.config.vocab_size,
      end_token_id=end_of_turn_id(self.tokenizer),
      classes=self.token_classes(),
    )
    if agent == USER:
      return user_constraint(self.tokenizer, batch, **options)
    if candidates is None:
      raise ValueError(
        "LLMBackend: constrained recommender calls need each prompt's candidate titles; pass "
        'candidates= (run_episodes does)'
      )
    rows = [list(row) for row in candidates]
    return recommender_constraint(self.tokenizer, rows + [rows[0]] * (batch - len(rows)), **options)

  def adapter_array(self, agent: str, batch: int) -> np.ndarray | None:
    """The per-row adapter selector for `agent` (None when the model has no adapters); scoring this agent's
    segments later must pass the same selector."""
    index = self.adapter_ids[agent]
    return None if index is None else np.full((batch,), index, np.int32)

  def _call_options(self, agent: str, batch: int, seed: int, candidates=None) -> dict[str, Any]:
    """The sampling options and per-row model arguments of one call of `batch` rows (both call kinds)."""
    options = dict(
      max_new_tokens=self.config.max_new_tokens(agent),
      params=self.config.sampling,
      buckets=self.config.buckets,
      eos_token_ids=self.special.eos_ids,
      pad_token_id=self.special.pad_id,
      seed=seed,
    )
    adapter = None if agent in self._merged else self.adapter_array(agent, batch)
    if adapter is not None:
      options['adapter'] = adapter
    if self.config.constrained:
      options['constraint'] = self.constraint(agent, batch, candidates)
    return options

  def _generation(self, text: str, prompt_ids: Sequence[int], outputs, row: int) -> Generation:
    """Row `row` of a call's (tokens, log_probs, lengths, finished) as a `Generation`."""
    tokens, log_probs, lengths, finished = outputs
    completion = tokens[row, : lengths[row]]
    return Generation(
      prompt_text=text,
      prompt_ids=np.asarray(prompt_ids, np.int32),
      completion_ids=completion,
      log_probs=log_probs[row, : lengths[row]],
      text=self.tokenizer.decode(completion.tolist(), skip_special_tokens=True),
      finished=bool(finished[row]),
    )

  @property
  def shares_prefixes(self) -> bool:
    """Whether `generate_grouped` can run (unsharded backends: the shared-prefix programs have no mesh form)."""
    return self.mesh is None

  def generate_grouped(
    self, agent: str, groups: Sequence[Sequence[Sequence[Message]]], *, seed: int, rows_per_group: int, num_groups: int
  ) -> list[list[Generation]]:
    """One sampled message per prompt of each group, where a group's prompts are single messages with a long
    common start (one user's F1 judgements): each group's shared tokens are prefilled once and read once per
    decode step for all its rows (`sampling.generate_shared_prefix`). The call runs `num_groups` groups of
    `rows_per_group` rows (short groups and a short call are padded with copies, whose outputs are dropped), so
    calls of one shape share compiled programs. Logged as one `BackendCall` (turn 1, group indices as episode
    ids). Greedy outputs equal `generate`'s to float rounding."""
    check_agent(agent)
    if not self.shares_prefixes:
      raise ValueError('LLMBackend.generate_grouped runs unsharded only; use generate on a mesh')
    sizes = [len(group) for group in groups]
    if not groups or len(groups) > num_groups or min(sizes) < 1 or max(sizes) > rows_per_group:
      raise ValueError(
        f'LLMBackend.generate_grouped: {len(groups)} groups of sizes {sizes} do not fit {num_groups} groups of '
        f'{rows_per_group} rows'
      )
    self.calls.append(BackendCall(agent=agent, turn=1, seed=seed, episode_ids=tuple(range(len(groups)))))
    flat = [prompt for group in groups for prompt in group]
    texts = [render_chat(self.tokenizer, messages) for messages in flat]
    ids = self.tokenizer(texts, add_special_tokens=False)['input_ids']
    prefixes, suffixes, begin = [], [], 0
    for size in sizes:
      rows = ids[begin : begin + size]
      shared = min(len(row) for row in rows) - 1  # every row keeps at least one token to prefill
      for row in rows[1:]:
        shared = min(shared, common_prefix_length(rows[0], row))
      if shared < 1:
        raise ValueError('LLMBackend.generate_grouped: the prompts of a group share no token before their last')
      prefixes.append(rows[0][:shared])
      suffixes.extend([row[shared:] for row in rows] + [rows[0][shared:]] * (rows_per_group - size))
      begin += size
    prefixes += [prefixes[0]] * (num_groups - len(groups))
    suffixes += suffixes[:rows_per_group] * (num_groups - len(groups))
    output = generate_shared_prefix(
      self._merged.get(agent, self.model),
      prefixes,
      suffixes,
      **self._call_options(agent, num_groups * rows_per_group, seed),
    )
    real = sum(len(row) for row in ids)
    reused = sum((size - 1) * len(prefix) for size, prefix in zip(sizes, prefixes))
    self.prefill_tokens['prefilled'] += real - reused
    self.prefill_tokens['reused'] += reused
    outputs = tuple(np.asarray(a) for a in (output.tokens, output.log_probs, output.lengths, output.finished))
    out, begin = [], 0
    for index, size in enumerate(sizes):
      rows = range(index * rows_per_group, index * rows_per_group + size)
      out.append([self._generation(texts[begin + k], ids[begin + k], outputs, row) for k, row in enumerate(rows)])
      begin += size
    return out

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
    """One sampled message per prompt (see `AgentBackend.generate`); `candidates` is used only when
    `config.constrained` is on, where recommender calls need it."""
    check_agent(agent)
    if len(prompts) != len(episode_ids):
      raise ValueError(f'LLMBackend: {len(prompts)} prompts but {len(episode_ids)} episode ids')
    if candidates is not None and len(candidates) != len(prompts):
      raise ValueError(f'LLMBackend: {len(prompts)} prompts but {len(candidates)} candidate lists')
    self.calls.append(BackendCall(agent=agent, turn=turn, seed=seed, episode_ids=tuple(int(e) for e in episode_ids)))
    encoded = self.dialogues.encode(agent, episode_ids, prompts)
    batch = self.config.padded_batch(len(encoded))
    token_lists = [ids for _, ids in encoded]
    token_lists += [token_lists[0]] * (batch - len(token_lists))
    prefix = self._prefix(agent, turn, episode_ids, token_lists)
    output = generate(
      self._merged.get(agent, self.model),
      token_lists,
      mesh=self.mesh,
      rules=self.rules,
      prefix=prefix,
      **self._call_options(agent, batch, seed, candidates),
    )
    real = sum(len(ids) for _, ids in encoded)
    reused = 0 if prefix is None else int(prefix.lengths[: len(encoded)].sum())
    self.prefill_tokens['prefilled'] += real - reused
    self.prefill_tokens['reused'] += reused
    # Rows sharded over other processes' devices are gathered: every process parses every message.
    outputs = fetch((output.tokens, output.log_probs, output.lengths, output.finished))
    tokens, lengths = outputs[0], outputs[2]
    if self.config.prefix_reuse:
      # The cache holds each row's prompt and its reply but the last sampled token (never fed back): completion
      # token j sits at slot P + j, P the prompt width. The next turn's prompt starts with all of them.
      slots, width = prompt_slots(output.prompt_mask), output.prompt_mask.shape[1]
      kept = {}
      for row, e in enumerate(episode_ids):
        fed = max(int(lengths[row]) - 1, 0)
        kept[int(e)] = (
          row,
          list(encoded[row][1]) + tokens[row, :fed].tolist(),
          np.concatenate([slots[row], width + np.arange(fed, dtype=np.int32)]),
        )
      self._last_prompts[agent] = (output.cache, kept)
    generations = [self._generation(text, ids, outputs, row) for row, (text, ids) in enumerate(encoded)]
    self.dialogues.remember(
      agent, episode_ids, prompts, encoded, [g.completion_ids for g in generations], [g.text for g in generations]
    )
    return generations
