"""Append-only dialogues on the real datasets and the research tokenizer (issue 21, section 1): for both agents on
LastFM, MovieLens and Instruments, turn t's prompt ids start with turn t-1's prompt and reply ids, token for token,
and the prompt text is the full chat rendered by the template. A prompt that does not extend the kept dialogue
(the user F1's single-turn rounds) is tokenised whole."""

import functools

import numpy as np
import pytest

from coars_jax.models import backbone
from coars_jax.agents.chat_tokens import DialogueTokens
from coars_jax.agents.episodes import RolloutConfig, ScriptedBackend, run_episodes
from coars_jax.agents.prompts import user_messages
from coars_jax.data import candidate_list, load_dataset
from coars_jax.models.tokenizer import end_of_turn_id, render_chat
from tests.conftest import real_data_root


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
  try:
    return backbone.load_tokenizer_for(backbone.BackboneSpec(name='smollm2-135m', allow_download=False))
  except (FileNotFoundError, ImportError) as error:
    pytest.skip(f'SmolLM2 tokenizer not available: {error}')


class FourthCandidatePeer:
  def top_candidates(self, history, lengths, candidates):
    return candidates[:, 3]

  def candidate_similarities(self, history, lengths, candidates):
    return np.zeros(candidates.shape)


@pytest.mark.parametrize('name', ['lastfm', 'movielens', 'instruments'])
def test_real_dialogues_are_append_only_token_for_token(name):
  root = real_data_root()
  if root is None:
    pytest.skip('no data root (COARS_DATA_DIR or ../shared/data)')
  dataset = load_dataset(name, root, allow_download=False)
  tokenizer = smollm2_tokenizer()
  windows = [0, 1, 2]
  candidates = {e: candidate_list(dataset, 'test', w, seed=0) for e, w in enumerate(windows)}

  def respond(agent, episode, turn, messages):
    # Turn k names the k-th candidate (never a click), so every episode plays all five turns.
    if agent == 'recommender':
      return f'Reason: it fits turn {turn}.\nItem: {dataset.catalog.titles[candidates[episode][turn]]}'
    return f'Reason: not for me, try again ({turn}).\nAction: skip\nScore: 0.3'

  backend = ScriptedBackend(tokenizer, respond)
  episodes = run_episodes(
    dataset, 'test', windows, backend, peer=FourthCandidatePeer(), config=RolloutConfig(max_turns=5, show_hint=True)
  )
  assert [e.num_turns for e in episodes] == [5, 5, 5]
  end = end_of_turn_id(tokenizer)
  for episode in episodes:
    for agent in ('recommender', 'user'):
      for before, after in zip(episode.turns, episode.turns[1:]):
        earlier, later = getattr(before, agent), getattr(after, agent)
        head = np.concatenate([earlier.prompt_ids, earlier.completion_ids])
        assert earlier.completion_ids[-1] == end
        np.testing.assert_array_equal(later.prompt_ids[: len(head)], head)
        # The new message is a small part of the prompt: about 1/t of it is new at turn t.
        assert len(later.prompt_ids) - len(head) < len(head) / 2
      # Here the replies tokenise canonically, so the sequence equals the whole chat tokenised at once.
      last = getattr(episode.turns[-1], agent)
      whole = tokenizer(last.prompt_text, add_special_tokens=False)['input_ids']
      np.testing.assert_array_equal(last.prompt_ids, whole)
  assert backend.dialogues.appended == 2 * 4 * len(windows)  # every turn after the first, both agents
  assert backend.dialogues.encoded == 2 * len(windows)


def test_prompts_that_do_not_extend_the_dialogue_are_tokenised_whole():
  tokenizer = smollm2_tokenizer()
  tokens = DialogueTokens(tokenizer)
  first = user_messages(history_titles=['A', 'B'], recommended_title='C', recommender_reason='r')
  ((text, ids),) = tokens.encode('user', [7], [first])
  assert text == render_chat(tokenizer, first) and ids == tokenizer(text, add_special_tokens=False)['input_ids']
  reply = 'Reason: fine\nAction: star\nScore: 0.6'
  reply_ids = np.asarray(tokenizer(reply, add_special_tokens=False)['input_ids'] + [end_of_turn_id(tokenizer)])
  tokens.remember('user', [7], [first], [(text, ids)], [reply_ids], [reply])
  # A user F1 round: another single-turn prompt of the same case shares a prefix but does not extend the chat.
  other = user_messages(history_titles=['A', 'B'], recommended_title='D', recommender_reason='r')
  ((_, other_ids),) = tokens.encode('user', [7], [other])
  assert other_ids == tokenizer(render_chat(tokenizer, other), add_special_tokens=False)['input_ids']
  # The next turn of the dialogue extends it: the kept ids, the reply's ids, then the new message alone.
  later = first + [{'role': 'assistant', 'content': reply}, {'role': 'user', 'content': 'The recommender now says: D'}]
  ((later_text, later_ids),) = tokens.encode('user', [7], [later])
  assert later_ids[: len(ids) + len(reply_ids)] == ids + reply_ids.tolist()
  assert later_ids == tokenizer(later_text, add_special_tokens=False)['input_ids']
  assert (tokens.appended, tokens.encoded) == (1, 2)
  # A cut reply (no end-of-turn token) is closed by one, which was not sampled.
  tokens.remember('user', [8], [first], [(text, ids)], [reply_ids[:-1]], [reply])
  ((_, closed),) = tokens.encode('user', [8], [later])
  assert closed[: len(ids) + len(reply_ids)] == ids + reply_ids.tolist()
