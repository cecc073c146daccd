"""The episode layer's public names in one place (the implementation follows the data flow): `backend` (the
interface, `Generation`, `ScriptedBackend`), `llm_backend` (`LLMBackend`), `peer` (SASRec's signals, the only
door to `recsys`), `episode` (`RolloutConfig`, `Turn`, `Episode`, metrics) and `dialogue_loop` (`run_episodes`)."""

from coars_jax.agents.backend import (
  AgentBackend,
  BackendCall,
  Generation,
  ScriptedBackend,
  check_agent,
  encode_prompt,
  encode_prompts,
)
from coars_jax.agents.dialogue_loop import run_episodes
from coars_jax.agents.episode import (
  NO_ITEM,
  NO_ITEM_SHOWN,
  Episode,
  RolloutConfig,
  Turn,
  action_id,
  episode_metrics,
  turn_seed,
)
from coars_jax.agents.llm_backend import LLMBackend, LLMBackendConfig
from coars_jax.agents.peer import Peer, SASRecPeer, bind_peer
from coars_jax.agents.protocol import ACTIONS, AGENTS, RECOMMENDER, USER

__all__ = [
  'ACTIONS',
  'AGENTS',
  'AgentBackend',
  'BackendCall',
  'Episode',
  'Generation',
  'LLMBackend',
  'LLMBackendConfig',
  'NO_ITEM',
  'NO_ITEM_SHOWN',
  'Peer',
  'RECOMMENDER',
  'RolloutConfig',
  'SASRecPeer',
  'ScriptedBackend',
  'Turn',
  'USER',
  'action_id',
  'bind_peer',
  'check_agent',
  'encode_prompt',
  'encode_prompts',
  'episode_metrics',
  'run_episodes',
  'turn_seed',
]
