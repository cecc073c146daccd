"""The multi-turn episode loop of METHOD.md section 2: a batch of user windows plays recommender-user dialogues
turn by turn together, each turn serving all still-live episodes with one batched generation per agent, until the
user clicks or T_u turns have passed. This module owns the backend interface the loop talks to (`AgentBackend`:
the real LLM through `coars_jax.sampling.generate`, or a script for tests and SFT warm starts), the peer signals
from SASRec (top candidate for the hint and the opinion p_t, similarity q_t), and the per-turn outcome of each
episode (hit_t, s_t, q_t, a_t, validity) as host-side records that `trajectory` turns into padded arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
from jax.sharding import Mesh

from coars_jax.agents.chat_tokens import DialogueTokens
from coars_jax.agents.output_constraints import recommender_constraint, user_constraint
from coars_jax.agents.parsing import (ParseConfig, RecommenderParse, UserParse, parse_recommender_output,
                                      parse_user_output)
from coars_jax.agents.prompts import Memory, Message, PromptConfig, TurnRecord, recommender_messages, user_messages
from coars_jax.agents.protocol import ACTIONS, AGENTS, RECOMMENDER, USER
from coars_jax.data.candidates import NUM_CANDIDATES, candidate_list
from coars_jax.data.schema import Dataset
from coars_jax.models.lora import ADAPTERS_OFF
from coars_jax.models.tokenizer import end_of_turn_id, render_chat, special_token_ids
from coars_jax.parallel.distributed import fetch
from coars_jax.parallel.rules import Rules
from coars_jax.recsys.peer import (candidate_ranking, candidate_scores, candidate_similarities, peer_opinion,
                                   top_candidate)
from coars_jax.recsys.sasrec import SASRec
from coars_jax.sampling import LengthBuckets, SamplingParams, generate
from coars_jax.sampling.sampler import PromptPrefix, common_prefix_length, prompt_slots
from coars_jax.sampling.constraints import token_classes

# The item a user prompt shows when the recommender's message had no `Item:` line at all.
NO_ITEM_SHOWN = '(no item named)'
# Item id stored for a turn whose recommender message named no candidate.
NO_ITEM = -1


def _check_agent(agent: str) -> int:
  if agent not in AGENTS:
    raise ValueError(f'agent must be one of {AGENTS}, found {agent!r}')
  return AGENTS.index(agent)


# --- backends ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Generation:
  """One agent message as a backend produced it.

  Attributes:
    prompt_text: the rendered chat prompt x (`models.tokenizer.render_chat`).
    prompt_ids: int32[P], the prompt's token ids, unpadded.
    completion_ids: int32[N], the generated token ids y, unpadded; the end-of-turn token that stopped the message
      is included (it is the action that ends the turn, so it is trained like any other token).
    log_probs: float32[N], the behaviour log-probs log pi_old(y_n | x, y_<n) under the distribution sampled from.
    text: the decoded message m_t, special tokens removed; this is what the parser reads.
    A backend behind an API (`agents.openai_api.OpenAIBackend`) has no token ids: its prompt_ids, completion_ids
    and log_probs are all empty, so its episodes can be evaluated but not trained on.
    finished: whether the message ended on an end-of-turn token (False: cut at the token budget).
  """

  prompt_text: str
  prompt_ids: np.ndarray
  completion_ids: np.ndarray
  log_probs: np.ndarray
  text: str
  finished: bool

  def __post_init__(self):
    for name, dtype in (('prompt_ids', np.int32), ('completion_ids', np.int32), ('log_probs', np.float32)):
      array = np.asarray(getattr(self, name), dtype)
      if array.ndim != 1:
        raise ValueError(f'Generation.{name} must be one-dimensional, found shape {array.shape}')
      object.__setattr__(self, name, array)
    if self.completion_ids.shape != self.log_probs.shape:
      raise ValueError(f'Generation.log_probs has shape {self.log_probs.shape} but completion_ids has '
                       f'{self.completion_ids.shape}; there must be one log-prob per generated token')
    if not self.prompt_ids.size and self.completion_ids.size:
      # Both empty is a message from an API (`agents.openai_api`), which returns text but no token ids.
      raise ValueError('Generation.prompt_ids is empty; every prompt has at least one token')


class AgentBackend(Protocol):
  """What the episode loop needs from a language model: one batched call per agent per turn."""

  def generate(self, agent: str, prompts: Sequence[Sequence[Message]], *, seed: int,
               episode_ids: Sequence[int], turn: int,
               candidates: Sequence[Sequence[str]] | None = None) -> list[Generation]:
    """One message per prompt, in order.

    Args:
      agent: 'recommender' or 'user'.
      prompts: the chat messages of each live episode's prompt.
      seed: the sampling seed of this call; the same seed and prompts give the same messages.
      episode_ids: the episode (row of the batch) each prompt belongs to; a model ignores it, a script uses it.
      turn: t, from 1.
      candidates: for recommender calls from `run_episodes`, each prompt's candidate titles C in prompt order
        (constrained decoding needs them); None otherwise. Backends that do not use it accept and ignore it.
    """
    ...


def encode_prompt(tokenizer, messages: Sequence[Message]) -> tuple[str, list[int]]:
  """(rendered prompt text, token ids): the chat template (or plain fallback), tokenized without adding special
  tokens, since the template writes its own (a second BOS would make prompts differ from training data)."""
  (encoded,) = encode_prompts(tokenizer, [messages])
  return encoded


def encode_prompts(tokenizer, prompts: Sequence[Sequence[Message]]) -> list[tuple[str, list[int]]]:
  """`encode_prompt` of every prompt, with one batched tokenizer call: a fast tokenizer encodes a batch on all
  cores (in Rust), with the same ids as one call per prompt."""
  texts = [render_chat(tokenizer, messages) for messages in prompts]
  if not texts:
    return []
  ids = tokenizer(texts, add_special_tokens=False)['input_ids']
  return [(text, list(row)) for text, row in zip(texts, ids)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackendCall:
  """One call the loop made to a backend, as `ScriptedBackend` and `LLMBackend` log it."""

  agent: str
  turn: int
  seed: int
  episode_ids: tuple[int, ...]

  @property
  def batch_size(self) -> int:
    return len(self.episode_ids)


class ScriptedBackend:
  """A backend that answers with given texts, tokenized like a model's output, with behaviour log-probs 0.

  For tests, and for building SFT warm-start trajectories from written answers: `respond(agent, episode_id, turn,
  messages)` returns the message text; its token ids are the tokenizer's encoding of that text plus the chat
  template's end-of-turn token, as a model that wrote the text and stopped would have produced. Every call is
  logged in `calls`.
  """

  def __init__(self, tokenizer, respond: Callable[[str, int, int, Sequence[Message]], str]):
    self.tokenizer = tokenizer
    self.respond = respond
    self.end_id = end_of_turn_id(tokenizer)
    self.calls: list[BackendCall] = []
    self.dialogues = DialogueTokens(tokenizer)

  def clear_prefixes(self) -> None:
    """Forgets the kept dialogues; `run_episodes` calls it when a rollout ends."""
    self.dialogues.clear()

  def generate(self, agent: str, prompts: Sequence[Sequence[Message]], *, seed: int,
               episode_ids: Sequence[int], turn: int,
               candidates: Sequence[Sequence[str]] | None = None) -> list[Generation]:
    del candidates  # a script writes what it was given
    _check_agent(agent)
    self.calls.append(BackendCall(agent=agent, turn=turn, seed=seed, episode_ids=tuple(int(e) for e in episode_ids)))
    generations = []
    encoded = self.dialogues.encode(agent, episode_ids, prompts)
    for episode_id, messages, (prompt_text, prompt_ids) in zip(episode_ids, prompts, encoded, strict=True):
      text = self.respond(agent, int(episode_id), turn, messages)
      if not isinstance(text, str):
        raise TypeError(f'ScriptedBackend: respond({agent!r}, episode {episode_id}, turn {turn}) returned '
                        f'{type(text).__name__}; it must return the message text')
      ids = list(self.tokenizer(text, add_special_tokens=False)['input_ids']) + [self.end_id]
      generations.append(Generation(prompt_text=prompt_text, prompt_ids=np.asarray(prompt_ids, np.int32),
                                    completion_ids=np.asarray(ids, np.int32),
                                    log_probs=np.zeros(len(ids), np.float32), text=text, finished=True))
    self.dialogues.remember(agent, episode_ids, prompts, encoded, [g.completion_ids for g in generations],
                            [g.text for g in generations])
    return generations


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
  """

  recommender_max_new_tokens: int = 128
  user_max_new_tokens: int = 128
  sampling: SamplingParams = SamplingParams()
  buckets: LengthBuckets = LengthBuckets()
  batch_buckets: tuple[int, ...] | None = None
  constrained: bool = False
  prefix_reuse: bool = True

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
          set(sizes)):
        raise ValueError(f'LLMBackendConfig.batch_buckets must be None or strictly increasing positive ints, found '
                         f'{self.batch_buckets!r}')
      object.__setattr__(self, 'batch_buckets', sizes)
    for name in ('constrained', 'prefix_reuse'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'LLMBackendConfig.{name} must be a bool, found {getattr(self, name)!r}')

  def max_new_tokens(self, agent: str) -> int:
    return self.recommender_max_new_tokens if _check_agent(agent) == 0 else self.user_max_new_tokens

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

  def __init__(self, model, tokenizer, *, adapters: Mapping[str, str | int | None] | None = None,
               config: LLMBackendConfig = LLMBackendConfig(), mesh: Mesh | None = None, rules: Rules | None = None):
    self.model, self.tokenizer, self.config = model, tokenizer, config
    self.mesh, self.rules = mesh, rules
    self.special = special_token_ids(tokenizer)
    if len(tokenizer) > model.config.vocab_size:
      raise ValueError(f'LLMBackend: the tokenizer has {len(tokenizer)} tokens but the model\'s vocab_size is '
                       f'{model.config.vocab_size}; ids past the embedding table cannot be run')
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
        raise ValueError(f'LLMBackend: adapters[{agent!r}]={choice!r} but the model has no LoRA adapters; attach '
                         f'them with models.add_lora or pass adapters=None for the base model')
      elif isinstance(choice, str):
        if choice not in model.adapter_names:
          raise ValueError(f'LLMBackend: adapters[{agent!r}]={choice!r} is not one of the model\'s adapters '
                           f'{model.adapter_names}')
        self.adapter_ids[agent] = model.adapter_names.index(choice)
      elif isinstance(choice, int) and not isinstance(choice, bool) and ADAPTERS_OFF <= choice < len(
          model.adapter_names):
        self.adapter_ids[agent] = choice
      else:
        raise ValueError(f'LLMBackend: adapters[{agent!r}] must be an adapter name, an index in '
                         f'[{ADAPTERS_OFF}, {len(model.adapter_names)}) or None; found {choice!r}')
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
      shared = common_prefix_length(ids[:len(ids) - 1], old_ids)  # at least one token is left to prefill
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
    options = dict(max_new_tokens=self.config.max_new_tokens(agent), vocab_size=self.model.config.vocab_size,
                   end_token_id=end_of_turn_id(self.tokenizer), classes=self.token_classes())
    if agent == USER:
      return user_constraint(self.tokenizer, batch, **options)
    if candidates is None:
      raise ValueError('LLMBackend: constrained recommender calls need each prompt\'s candidate titles; pass '
                       'candidates= (run_episodes does)')
    rows = [list(row) for row in candidates]
    return recommender_constraint(self.tokenizer, rows + [rows[0]] * (batch - len(rows)), **options)

  def adapter_array(self, agent: str, batch: int) -> np.ndarray | None:
    """The per-row adapter selector for `agent` (None when the model has no adapters); scoring this agent's
    segments later must pass the same selector."""
    index = self.adapter_ids[agent]
    return None if index is None else np.full((batch,), index, np.int32)

  def generate(self, agent: str, prompts: Sequence[Sequence[Message]], *, seed: int,
               episode_ids: Sequence[int], turn: int,
               candidates: Sequence[Sequence[str]] | None = None) -> list[Generation]:
    """One sampled message per prompt (see `AgentBackend.generate`); `candidates` is used only when
    `config.constrained` is on, where recommender calls need it."""
    _check_agent(agent)
    if len(prompts) != len(episode_ids):
      raise ValueError(f'LLMBackend: {len(prompts)} prompts but {len(episode_ids)} episode ids')
    if candidates is not None and len(candidates) != len(prompts):
      raise ValueError(f'LLMBackend: {len(prompts)} prompts but {len(candidates)} candidate lists')
    self.calls.append(BackendCall(agent=agent, turn=turn, seed=seed, episode_ids=tuple(int(e) for e in episode_ids)))
    encoded = self.dialogues.encode(agent, episode_ids, prompts)
    batch = self.config.padded_batch(len(encoded))
    token_lists = [ids for _, ids in encoded]
    token_lists += [token_lists[0]] * (batch - len(token_lists))
    kwargs = {}
    adapter = self.adapter_array(agent, batch)
    if adapter is not None:
      kwargs['adapter'] = adapter
    if self.config.constrained:
      kwargs['constraint'] = self.constraint(agent, batch, candidates)
    prefix = self._prefix(agent, turn, episode_ids, token_lists)
    output = generate(self.model, token_lists, max_new_tokens=self.config.max_new_tokens(agent),
                      params=self.config.sampling, buckets=self.config.buckets,
                      eos_token_ids=self.special.eos_ids, pad_token_id=self.special.pad_id, seed=seed,
                      mesh=self.mesh, rules=self.rules, prefix=prefix, **kwargs)
    real = sum(len(ids) for _, ids in encoded)
    reused = 0 if prefix is None else int(prefix.lengths[:len(encoded)].sum())
    self.prefill_tokens['prefilled'] += real - reused
    self.prefill_tokens['reused'] += reused
    # Rows sharded over other processes' devices are gathered: every process parses every message.
    tokens, log_probs, lengths, finished = fetch((output.tokens, output.log_probs, output.lengths, output.finished))
    if self.config.prefix_reuse:
      # The cache holds each row's prompt and its reply but the last sampled token (never fed back): completion
      # token j sits at slot P + j, P the prompt width. The next turn's prompt starts with all of them.
      slots, width = prompt_slots(output.prompt_mask), output.prompt_mask.shape[1]
      kept = {}
      for row, e in enumerate(episode_ids):
        fed = max(int(lengths[row]) - 1, 0)
        kept[int(e)] = (row, list(encoded[row][1]) + tokens[row, :fed].tolist(),
                        np.concatenate([slots[row], width + np.arange(fed, dtype=np.int32)]))
      self._last_prompts[agent] = (output.cache, kept)
    generations = []
    for row, (prompt_text, prompt_ids) in enumerate(encoded):
      completion = tokens[row, :lengths[row]]
      generations.append(Generation(
          prompt_text=prompt_text, prompt_ids=np.asarray(prompt_ids, np.int32), completion_ids=completion,
          log_probs=log_probs[row, :lengths[row]],
          text=self.tokenizer.decode(completion.tolist(), skip_special_tokens=True),
          finished=bool(finished[row])))
    self.dialogues.remember(agent, episode_ids, prompts, encoded, [g.completion_ids for g in generations],
                            [g.text for g in generations])
    return generations


# --- peer signals ------------------------------------------------------------------------------------------------

class Peer(Protocol):
  """SASRec's side of the protocol, over a batch of windows (histories in the schema's padded layout)."""

  def top_candidates(self, history: np.ndarray, lengths: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """int[B]: the highest-scored item of each candidate list C (the hint, and the item p_t names)."""
    ...

  def candidate_similarities(self, history: np.ndarray, lengths: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """float[B, C]: q in [-1, 1] between each user and each of their candidates."""
    ...

  # Optional: `candidate_ranking(history, lengths, candidates) -> int[B, C]`, each list best first. With it the
  # hint moves on to the best candidate not yet recommended; without it the hint stays on the top candidate.


class SASRecPeer:
  """`Peer` from one trained SASRec (`recsys.SASRec`), via `recsys.peer`."""

  def __init__(self, model):
    self.model = model

  def candidate_scores(self, history, lengths, candidates):
    return np.asarray(candidate_scores(self.model, np.asarray(history, np.int32), np.asarray(lengths, np.int32),
                                       np.asarray(candidates, np.int32)))

  def candidate_ranking(self, history, lengths, candidates):
    return candidate_ranking(self.model, history, lengths, candidates)

  def top_candidates(self, history, lengths, candidates):
    return np.asarray(top_candidate(self.model, np.asarray(history, np.int32), np.asarray(lengths, np.int32),
                                    np.asarray(candidates, np.int32)))

  def candidate_similarities(self, history, lengths, candidates):
    return candidate_similarities(self.model, history, lengths, candidates)


def bind_peer(peer, split: str, users) -> Peer:
  """The `Peer` of windows of `split` with these users: a cross-fitted peer (`recsys.CrossFittedPeer`) serves
  each training window by its user's out-of-fold SASRec (METHOD.md section 2); a SASRec is wrapped in
  `SASRecPeer`; any other `Peer` serves every row itself."""
  if hasattr(peer, 'for_windows'):
    return peer.for_windows(split, np.asarray(users))
  return _as_peer(peer)


# --- the loop ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
  """The dialogue protocol of METHOD.md section 2.

  Attributes:
    max_turns: T_u, the most turns an episode runs (default 5, as in AFL); it stops earlier on a click.
    candidate_seed: the seed of the candidate lists C (`data.candidate_list`); fixed so C is the same every run.
    num_candidates: |C| (20 in the protocol).
    show_hint: whether the recommender's input x_rec_t includes SASRec's top pick as a hint (the paper's
      "optionally"); off by default, so the recommender's Hit@1 is its own. The hint at turn t is SASRec's
      highest-scored candidate that this episode has not recommended yet (at t = 1, its top candidate), when the
      peer can rank candidates (`SASRecPeer` can); otherwise SASRec's top candidate at every turn.
    show_peer_opinion: whether the user's input x_user_t includes the peer opinion p_t naming SASRec's top
      candidate (on, as the protocol has it).
    prompt: wording of both prompts; None takes `PromptConfig.for_dataset(dataset.name)`.
    parse: parser tolerance for both agents' messages.
  """

  max_turns: int = 5
  candidate_seed: int = 0
  num_candidates: int = NUM_CANDIDATES
  show_hint: bool = False
  show_peer_opinion: bool = True
  prompt: PromptConfig | None = None
  parse: ParseConfig = ParseConfig()

  def __post_init__(self):
    for name, least in (('max_turns', 1), ('candidate_seed', 0), ('num_candidates', 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f'RolloutConfig.{name} must be an int >= {least}, found {value!r}')
    for name in ('show_hint', 'show_peer_opinion'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'RolloutConfig.{name} must be a bool, found {getattr(self, name)!r}')
    if self.prompt is not None and not isinstance(self.prompt, PromptConfig):
      raise TypeError(f'RolloutConfig.prompt must be a PromptConfig or None, found {type(self.prompt).__name__}')
    if not isinstance(self.parse, ParseConfig):
      raise TypeError(f'RolloutConfig.parse must be a ParseConfig, found {type(self.parse).__name__}')


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Turn:
  """Turn t of one episode: both messages, what was read from them, and the per-turn reward inputs.

  Attributes:
    turn: t, from 1.
    recommender: the recommender's message m_rec_t with its prompt x_rec_t.
    user: the user's message m_user_t with its prompt x_user_t.
    recommender_parse: r_t and i_t as parsed; `valid` is False when no candidate was named.
    user_parse: j_t, a_t and s_t as parsed (an invalid message reads as a skip at s = .375).
    shown_title: the item as the user prompt and the memory show it: the matched candidate's title, else what
      the recommender's `Item:` line said, else `NO_ITEM_SHOWN`.
    shown_reason: the recommender's reason as shown: r_t, else (no `Reason:` line) the whole message in one line.
    item: i_t, the item id of the named candidate; `NO_ITEM` when none was named.
    hit: hit_t = 1 iff i_t = i* (False for an invalid message: a miss, METHOD.md section 2).
    acceptance_score: s_t in [0, 1].
    peer_similarity: q_t in [-1, 1], SASRec's cosine between the user and i_t; 0 when no item was named, so that
      the peer term of R_user (Eq. 8) vanishes rather than scoring an item that does not exist.
    action: a_t, one of `ACTIONS`.
    hint_title: the hint x_rec_t showed (the peer's best candidate not yet recommended, `RolloutConfig.show_hint`),
      or None without a hint; what a trainer needs to rebuild x_rec_t.
  """

  turn: int
  recommender: Generation
  user: Generation
  recommender_parse: RecommenderParse
  user_parse: UserParse
  shown_title: str
  shown_reason: str
  item: int
  hit: bool
  acceptance_score: float
  peer_similarity: float
  action: str
  hint_title: str | None = None

  @property
  def record(self) -> TurnRecord:
    """(m_rec_t, m_user_t) as the memory keeps it."""
    return TurnRecord(item_title=self.shown_title, recommender_reason=self.shown_reason,
                      user_action=self.action, user_score=self.acceptance_score, user_reason=self.user_parse.reason,
                      recommender_message=self.recommender.text, user_message=self.user.text,
                      hint_title=self.hint_title)

  @property
  def clicked(self) -> bool:
    return self.action == 'click'


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Episode:
  """One window's dialogue.

  Attributes:
    split, window_index: where the window comes from.
    user: its user id.
    history: h_u as item ids, oldest first; `history_titles` as shown.
    target: i*; `target_title` its title (never shown to the user agent unless the dialogue named it).
    candidates: C as item ids, in prompt order; `candidate_titles` as shown.
    peer_item: SASRec's top candidate (the hint and the item p_t names); `peer_title` its title.
    turns: turns 1..T in order.
  """

  split: str
  window_index: int
  user: int
  history: tuple[int, ...]
  history_titles: tuple[str, ...]
  target: int
  target_title: str
  candidates: tuple[int, ...]
  candidate_titles: tuple[str, ...]
  peer_item: int
  peer_title: str
  turns: tuple[Turn, ...]

  @property
  def num_turns(self) -> int:
    return len(self.turns)

  @property
  def final_item(self) -> int:
    """i_T, the item of the last turn: the episode's recommendation (`NO_ITEM` if that message named none)."""
    return self.turns[-1].item

  @property
  def final_hit(self) -> bool:
    return self.final_item == self.target

  @property
  def clicked(self) -> bool:
    return self.turns[-1].clicked

  def memory(self, before_turn: int | None = None) -> Memory:
    """M_{t-1} for `before_turn` = t (the memory shown in turn t's prompts); the final memory M_T by default."""
    count = len(self.turns) if before_turn is None else before_turn - 1
    return Memory(tuple(turn.record for turn in self.turns[:count]))


def turn_seed(seed: int, turn: int, agent: str) -> int:
  """The sampling seed of one batched call: a function of the rollout seed, t and the agent alone, so a rerun
  of the same batch draws the same messages and the two agents never share a random stream."""
  state = np.random.SeedSequence([int(seed), int(turn), _check_agent(agent)]).generate_state(1)[0]
  return int(state & 0x7FFFFFFF)


def _shown(parse: RecommenderParse, text: str) -> tuple[str, str]:
  """(item title, reason) the user agent and the memory see for a recommender message.

  An invalid message is shown as written rather than hidden: the user reacts to what the recommender actually
  said, and the recommender's next turn sees in memory how that went. Neither can leak the target to the user
  beyond what the recommender wrote.
  """
  if parse.title is not None:
    title = parse.title
  elif parse.item_text:
    title = parse.item_text
  else:
    title = NO_ITEM_SHOWN
  reason = parse.reason
  if not reason and parse.item_text is None:
    reason = ' '.join(text.split())
  return title, reason


def run_episodes(dataset: Dataset, split: str, window_indices: Sequence[int], backend: AgentBackend, *,
                 peer, config: RolloutConfig = RolloutConfig(), seed: int = 0,
                 on_turn: Callable[[int], None] | None = None) -> list[Episode]:
  """Plays one episode per window, all turn by turn together (METHOD.md section 2).

  Turn t: one `backend.generate('recommender', ..., candidates=)` call for every live episode (with each
  episode's candidate titles, which a constrained backend restricts the item to), parsing; then one
  `backend.generate('user', ...)` call for the same episodes; then the memory grows by (m_rec_t, m_user_t).
  Episodes whose user clicked are finished and leave the later calls; the rest stop after T_u turns.

  Args:
    dataset: the windows and titles.
    split: 'train', 'val' or 'test'.
    window_indices: the windows to play, one episode each, in this order (repeats allowed, e.g. G rollouts of a
      sample for a group baseline; repeats draw different messages, since sampling differs per row).
    backend: `LLMBackend`, `ScriptedBackend` or anything with the `AgentBackend` method.
    peer: a `Peer` (e.g. `SASRecPeer`), a `recsys.SASRec` model (wrapped in `SASRecPeer`), or a
      `recsys.CrossFittedPeer`, bound to these windows' users (`bind_peer`).
    config: the protocol settings.
    seed: the rollout's sampling seed (`turn_seed` derives each call's).
    on_turn: called with t after turn t's two calls (progress bars tick per turn).
  Returns:
    The episodes in the order of `window_indices`.
  """
  if not isinstance(config, RolloutConfig):
    raise TypeError(f'config must be a RolloutConfig, found {type(config).__name__}')
  windows = dataset.split(split)
  indices = [int(i) for i in window_indices]
  if not indices:
    raise ValueError('window_indices is empty; give at least one window to play')
  out_of_range = [i for i in indices if not 0 <= i < len(windows)]
  if out_of_range:
    raise ValueError(f'window_indices {out_of_range[:5]} are outside split {split!r} of {dataset.name!r}, which '
                     f'has {len(windows)} windows')
  prompt_config = config.prompt or PromptConfig.for_dataset(dataset.name)
  titles = dataset.catalog.titles
  batch = len(indices)

  candidates = np.stack([candidate_list(dataset, split, i, config.candidate_seed, config.num_candidates)
                         for i in indices]).astype(np.int32)
  history, lengths = windows.history[indices], windows.lengths[indices]
  peer = bind_peer(peer, split, windows.users[indices])
  peer_items = np.asarray(peer.top_candidates(history, lengths, candidates)).astype(np.int64)
  similarities = np.asarray(peer.candidate_similarities(history, lengths, candidates), np.float64)
  if peer_items.shape != (batch,) or similarities.shape != candidates.shape:
    raise ValueError(f'peer returned top candidates of shape {peer_items.shape} and similarities of shape '
                     f'{similarities.shape}; expected ({batch},) and {candidates.shape}')
  for row in range(batch):
    if peer_items[row] not in candidates[row]:
      raise ValueError(f'peer top candidate {int(peer_items[row])} of window {indices[row]} is not in its candidate '
                       f'list; the hint and p_t must name a candidate')

  ranking = None
  if config.show_hint and hasattr(peer, 'candidate_ranking'):
    ranking = np.asarray(peer.candidate_ranking(history, lengths, candidates)).astype(np.int64)
    if ranking.shape != candidates.shape or (ranking[:, 0] != peer_items).any():
      raise ValueError(f'peer candidate_ranking returned shape {ranking.shape} (expected {candidates.shape}) or a '
                       f'first column that is not its top candidate')

  def hint_item(e: int) -> int:
    if ranking is None:
      return int(peer_items[e])
    shown = {turn.item for turn in turns[e]}
    return int(next((item for item in ranking[e] if item not in shown), peer_items[e]))

  window_list = [windows.window(i) for i in indices]
  history_titles = [[titles[item] for item in window.history] for window in window_list]
  candidate_titles = [[titles[item] for item in row] for row in candidates]
  turns: list[list[Turn]] = [[] for _ in range(batch)]
  memories = [Memory() for _ in range(batch)]
  live = list(range(batch))

  try:
    for t in range(1, config.max_turns + 1):
      hints = {e: titles[hint_item(e)] if config.show_hint else None for e in live}
      rec_prompts = [recommender_messages(
          history_titles=history_titles[e], candidate_titles=candidate_titles[e], memory=memories[e],
          hint_title=hints[e], config=prompt_config) for e in live]
      rec_out = _checked(backend.generate(RECOMMENDER, rec_prompts, seed=turn_seed(seed, t, RECOMMENDER),
                                          episode_ids=live, turn=t, candidates=[candidate_titles[e] for e in live]),
                         len(live), RECOMMENDER)
      rec_parses = [parse_recommender_output(g.text, candidate_titles[e], candidates[e].tolist(), config.parse)
                    for e, g in zip(live, rec_out)]
      shown = [_shown(p, g.text) for p, g in zip(rec_parses, rec_out)]

      user_prompts = [user_messages(
          history_titles=history_titles[e], recommended_title=title, recommender_reason=reason, memory=memories[e],
          peer_opinion=peer_opinion(titles[peer_items[e]]) if config.show_peer_opinion else None,
          config=prompt_config) for e, (title, reason) in zip(live, shown)]
      user_out = _checked(backend.generate(USER, user_prompts, seed=turn_seed(seed, t, USER), episode_ids=live,
                                           turn=t), len(live), USER)

      still_live = []
      for row, e in enumerate(live):
        rec_parse = rec_parses[row]
        user_parse = parse_user_output(user_out[row].text, config.parse)
        item = rec_parse.item_id if rec_parse.valid else NO_ITEM
        turn = Turn(
            turn=t, recommender=rec_out[row], user=user_out[row], recommender_parse=rec_parse, user_parse=user_parse,
            shown_title=shown[row][0], shown_reason=shown[row][1], item=item,
            hit=bool(item == window_list[e].target),
            acceptance_score=float(user_parse.score),
            peer_similarity=float(similarities[e, rec_parse.candidate_index]) if rec_parse.valid else 0.0,
            action=user_parse.action, hint_title=hints[e])
        turns[e].append(turn)
        memories[e] = memories[e].append(turn.record)
        if not turn.clicked:
          still_live.append(e)
      live = still_live
      if on_turn is not None:
        on_turn(t)
      if not live:
        break
  finally:
    # Kept KV caches (`LLMBackendConfig.prefix_reuse`) must not outlive this rollout's parameters.
    if hasattr(backend, 'clear_prefixes'):
      backend.clear_prefixes()

  return [Episode(split=split, window_index=indices[e], user=window_list[e].user, history=window_list[e].history,
                  history_titles=tuple(history_titles[e]), target=window_list[e].target,
                  target_title=titles[window_list[e].target], candidates=tuple(candidates[e].tolist()),
                  candidate_titles=tuple(candidate_titles[e]), peer_item=int(peer_items[e]),
                  peer_title=titles[peer_items[e]], turns=tuple(turns[e])) for e in range(batch)]


def _as_peer(peer):
  if isinstance(peer, SASRec):
    return SASRecPeer(peer)
  if not (hasattr(peer, 'top_candidates') and hasattr(peer, 'candidate_similarities')):
    raise TypeError(f'peer must be a recsys.SASRec or have top_candidates and candidate_similarities methods '
                    f'(see episodes.Peer); found {type(peer).__name__}')
  return peer


def _checked(generations, expected: int, agent: str) -> list[Generation]:
  generations = list(generations)
  if len(generations) != expected:
    raise ValueError(f'the backend returned {len(generations)} {agent} messages for {expected} prompts')
  for index, generation in enumerate(generations):
    if not isinstance(generation, Generation):
      raise TypeError(f'the backend returned {type(generation).__name__} for {agent} prompt {index}; expected a '
                      f'Generation')
  return generations


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
  """METHOD.md section 6 over a set of episodes.

  Returns:
    hit_at_1: the share of episodes whose final item i_T is the target i*.
    valid_ratio: the share of recommender messages (every turn) that named a candidate.
    average_turns: mean turns per episode.
    click_rate: the share of episodes that ended on a click.
    user_valid_ratio: the share of user messages with a usable action.
  """
  if not episodes:
    raise ValueError('episode_metrics needs at least one episode')
  turns = [turn for episode in episodes for turn in episode.turns]
  return {
      'hit_at_1': float(np.mean([episode.final_hit for episode in episodes])),
      'valid_ratio': float(np.mean([turn.recommender_parse.valid for turn in turns])),
      'average_turns': float(np.mean([episode.num_turns for episode in episodes])),
      'click_rate': float(np.mean([episode.clicked for episode in episodes])),
      'user_valid_ratio': float(np.mean([turn.user_parse.valid for turn in turns])),
  }


def action_id(action: str) -> int:
  """The index of a_t in `protocol.ACTIONS` (dislike 0, skip 1, star 2, click 3)."""
  return ACTIONS.index(action)

