"""The two agents' side of the dialogue protocol: prompt building, the episode memory, output formats and parsing."""

from coars_jax.agents.parsing import (INVALID_ACTION, INVALID_SCORE, MATCH_RULES, SCORE_RULES, ParseConfig,
                                      ParseSummary, RecommenderParse, UserParse, match_candidate, normalize_title,
                                      parse_recommender_output, parse_score, parse_user_output, summarize)
from coars_jax.agents.prompts import (DATASET_ITEM_NOUNS, Memory, PromptConfig, TurnRecord,
                                      format_recommender_output, format_user_output, recommender_messages,
                                      render_memory, user_messages)
from coars_jax.agents.protocol import (ACTION_INTERVALS, ACTIONS, POSITIVE_ACTIONS, action_for_score,
                                       clip_to_action, format_score, in_interval, interval_midpoint,
                                       is_single_line_title, single_line)

__all__ = [
    'ACTIONS', 'ACTION_INTERVALS', 'DATASET_ITEM_NOUNS', 'INVALID_ACTION', 'INVALID_SCORE', 'MATCH_RULES', 'Memory',
    'POSITIVE_ACTIONS', 'ParseConfig', 'ParseSummary', 'PromptConfig', 'RecommenderParse', 'SCORE_RULES',
    'TurnRecord', 'UserParse', 'action_for_score', 'clip_to_action', 'format_recommender_output', 'format_score',
    'format_user_output', 'in_interval', 'interval_midpoint', 'is_single_line_title', 'match_candidate',
    'normalize_title', 'parse_recommender_output', 'parse_score', 'parse_user_output', 'recommender_messages',
    'render_memory', 'single_line', 'summarize', 'user_messages',
]

# The episode loop and its padded trajectories (these pull in the sampler, the decoder and SASRec).
from coars_jax.agents.episodes import (AGENTS, NO_ITEM, NO_ITEM_SHOWN, AgentBackend, BackendCall, Episode, Generation,
                                       LLMBackend, LLMBackendConfig, Peer, RolloutConfig, SASRecPeer, ScriptedBackend,
                                       Turn, episode_metrics, run_episodes, turn_seed)
from coars_jax.agents.trajectory import Trajectory, episode_record, read_jsonl, to_jsonl

__all__ += [
    'AGENTS', 'AgentBackend', 'BackendCall', 'Episode', 'Generation', 'LLMBackend', 'LLMBackendConfig', 'NO_ITEM',
    'NO_ITEM_SHOWN', 'Peer', 'RolloutConfig', 'SASRecPeer', 'ScriptedBackend', 'Trajectory', 'Turn',
    'episode_metrics', 'episode_record', 'read_jsonl', 'run_episodes', 'to_jsonl', 'turn_seed',
]

# The Reflexion-style memory baseline: earlier episodes of the same user, kept as text.
from coars_jax.agents.reflexion import (PRIOR_SPLIT, ReflexionConfig, ReflexionRun, ReflexionStep, prior_windows,
                                        reflection_section, reflection_text, run_reflexion_episodes)

__all__ += ['PRIOR_SPLIT', 'ReflexionConfig', 'ReflexionRun', 'ReflexionStep', 'prior_windows', 'reflection_section',
            'reflection_text', 'run_reflexion_episodes']
