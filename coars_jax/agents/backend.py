"""What the episode loop talks to: `AgentBackend` (one batched call per agent per turn), the `Generation` it returns,
and `ScriptedBackend`, which answers with given texts tokenised like a model's output (tests and the SFT warm
start's scripted dialogues). Both the scripted and the LLM backend encode prompts through `chat_tokens`."""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence

import numpy as np

from coars_jax.agents.chat_tokens import DialogueTokens
from coars_jax.agents.prompts import Message
from coars_jax.agents.protocol import AGENTS
from coars_jax.models.tokenizer import end_of_turn_id, render_chat


def check_agent(agent: str) -> int:
  if agent not in AGENTS:
    raise ValueError(f'agent must be one of {AGENTS}, found {agent!r}')
  return AGENTS.index(agent)


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
      raise ValueError(
        f'Generation.log_probs has shape {self.log_probs.shape} but completion_ids has '
        f'{self.completion_ids.shape}; there must be one log-prob per generated token'
      )
    if not self.prompt_ids.size and self.completion_ids.size:
      # Both empty is a message from an API (`agents.openai_api`), which returns text but no token ids.
      raise ValueError('Generation.prompt_ids is empty; every prompt has at least one token')


class AgentBackend(Protocol):
  """What the episode loop needs from a language model: one batched call per agent per turn."""

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
    del candidates  # a script writes what it was given
    check_agent(agent)
    self.calls.append(BackendCall(agent=agent, turn=turn, seed=seed, episode_ids=tuple(int(e) for e in episode_ids)))
    generations = []
    encoded = self.dialogues.encode(agent, episode_ids, prompts)
    for episode_id, messages, (prompt_text, prompt_ids) in zip(episode_ids, prompts, encoded, strict=True):
      text = self.respond(agent, int(episode_id), turn, messages)
      if not isinstance(text, str):
        raise TypeError(
          f'ScriptedBackend: respond({agent!r}, episode {episode_id}, turn {turn}) returned '
          f'{type(text).__name__}; it must return the message text'
        )
      ids = list(self.tokenizer(text, add_special_tokens=False)['input_ids']) + [self.end_id]
      generations.append(
        Generation(
          prompt_text=prompt_text,
          prompt_ids=np.asarray(prompt_ids, np.int32),
          completion_ids=np.asarray(ids, np.int32),
          log_probs=np.zeros(len(ids), np.float32),
          text=text,
          finished=True,
        )
      )
    self.dialogues.remember(
      agent, episode_ids, prompts, encoded, [g.completion_ids for g in generations], [g.text for g in generations]
    )
    return generations
