"""Append-only token sequences of the agents' dialogues: per agent and episode, a backend keeps the token ids of
its last prompt and reply, and when the next prompt is that prompt + the reply (as an assistant message) + one new
user message, its ids are the kept ids, the reply's sampled ids and the ids of the new text alone. So a dialogue is
one token sequence per agent, turn t's prompt starts token for token with turn t-1's prompt and reply, and only
the new text is rendered and tokenised; a chat template that is not append-only falls back to tokenising the
whole prompt. Both `LLMBackend` and `ScriptedBackend` encode through `DialogueTokens`, so SFT data and rollouts
share one layout.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from coars_jax.models.tokenizer import end_of_turn_id, render_chat

Message = dict[str, str]

# Stands for the reply while the chat template renders the text that follows it; occurs in no prompt.
_REPLY_SENTINEL = '\u2063\u2064REPLY\u2064\u2063'


@dataclasses.dataclass(frozen=True)
class _Kept:
  messages: tuple[tuple[str, str], ...]
  prompt_text: str
  prompt_ids: tuple[int, ...]
  completion_ids: tuple[int, ...]
  reply_text: str


def _frozen(messages: Sequence[Message]) -> tuple[tuple[str, str], ...]:
  return tuple((m['role'], m['content']) for m in messages)


class DialogueTokens:
  """Encodes each call's prompts, reusing each episode's previous prompt and reply of the same agent.

  `encode(agent, episode_ids, prompts)` returns (prompt text, token ids) per prompt; `remember(...)` keeps what a
  call produced; `clear()` forgets every dialogue (a rollout's end). Counters: `appended` prompts built by
  appending, `encoded` prompts tokenised whole.
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.end_id = end_of_turn_id(tokenizer)
    self.end_text = tokenizer.decode([self.end_id], skip_special_tokens=False)
    self._kept: dict[tuple[str, int], _Kept] = {}
    self.appended = 0
    self.encoded = 0

  def clear(self) -> None:
    self._kept.clear()

  def _new_text(self, kept: _Kept, messages: Sequence[Message]) -> str | None:
    """The text the template writes after the reply (its end-of-turn marker left out when the reply's ids hold
    it), or None when `messages` does not extend the kept dialogue or the template is not append-only there."""
    frozen = _frozen(messages)
    if (
      len(frozen) != len(kept.messages) + 2
      or frozen[:-2] != kept.messages
      or frozen[-2] != ('assistant', kept.reply_text)
      or frozen[-1][0] != 'user'
    ):
      return None
    probe = render_chat(
      self.tokenizer,
      [dict(role=r, content=c) for r, c in kept.messages]
      + [{'role': 'assistant', 'content': _REPLY_SENTINEL}, dict(messages[-1])],
    )
    head = kept.prompt_text + _REPLY_SENTINEL
    if not probe.startswith(head):
      return None
    tail = probe[len(head) :]
    if self.end_text and tail.startswith(self.end_text):
      tail = tail[len(self.end_text) :]
    return tail

  def encode(
    self, agent: str, episode_ids: Sequence[int], prompts: Sequence[Sequence[Message]]
  ) -> list[tuple[str, list[int]]]:
    texts, heads, tails, whole = [], [], [], []
    for position, (episode, messages) in enumerate(zip(episode_ids, prompts, strict=True)):
      texts.append(render_chat(self.tokenizer, messages))
      kept = self._kept.get((agent, int(episode)))
      tail = None if kept is None else self._new_text(kept, messages)
      if tail is None:
        whole.append(position)
        heads.append(None)
        tails.append('')
        continue
      closing = [] if kept.completion_ids and kept.completion_ids[-1] == self.end_id else [self.end_id]
      heads.append(list(kept.prompt_ids) + list(kept.completion_ids) + closing)
      tails.append(tail)
    # One batched tokenizer call for the new texts and one for the prompts tokenised whole.
    appended = [p for p in range(len(texts)) if heads[p] is not None]
    tail_ids = self.tokenizer([tails[p] for p in appended], add_special_tokens=False)['input_ids'] if appended else []
    whole_ids = self.tokenizer([texts[p] for p in whole], add_special_tokens=False)['input_ids'] if whole else []
    out: list[tuple[str, list[int]]] = [None] * len(texts)  # type: ignore[list-item]
    for position, ids in zip(appended, tail_ids):
      out[position] = (texts[position], heads[position] + list(ids))
    for position, ids in zip(whole, whole_ids):
      out[position] = (texts[position], list(ids))
    self.appended += len(appended)
    self.encoded += len(whole)
    return out

  def remember(
    self,
    agent: str,
    episode_ids: Sequence[int],
    prompts: Sequence[Sequence[Message]],
    encoded: Sequence[tuple[str, list[int]]],
    completions: Sequence[np.ndarray],
    replies: Sequence[str],
  ) -> None:
    for episode, messages, (text, ids), completion, reply in zip(
      episode_ids, prompts, encoded, completions, replies, strict=True
    ):
      self._kept[(agent, int(episode))] = _Kept(
        messages=_frozen(messages),
        prompt_text=text,
        prompt_ids=tuple(int(i) for i in ids),
        completion_ids=tuple(int(i) for i in np.asarray(completion).tolist()),
        reply_text=reply,
      )
