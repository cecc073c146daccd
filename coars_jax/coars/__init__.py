"""The CoARS method (METHOD.md sections 3-5): interaction and outcome rewards (`rewards`), the reference
trajectory d and teacher prompt x + d (`reference`), self-distilled token credit with one-pass teacher and
student scoring (`credit`), and the Eq. 11-12 objective over both agents (`loss`)."""

from coars_jax.coars.credit import TeacherStudentLogProbs, teacher_student_log_probs, token_advantages
from coars_jax.coars.loss import coars_loss, coars_objective
from coars_jax.coars.reference import (
  TurnHindsight,
  candidate_ranks,
  episode_reference,
  hindsight_turns,
  recommender_reference,
  reference_trajectory,
  self_diagnosis_messages,
  self_written_reference,
  teacher_messages,
  user_reference,
)
from coars_jax.coars.rewards import (
  REWARD_KINDS,
  agent_reward,
  interaction_rewards,
  judge_rewards,
  outcome_rewards,
  segment_rewards,
  stage_weight,
)

__all__ = [
  'REWARD_KINDS',
  'TeacherStudentLogProbs',
  'TurnHindsight',
  'agent_reward',
  'candidate_ranks',
  'coars_loss',
  'coars_objective',
  'episode_reference',
  'hindsight_turns',
  'interaction_rewards',
  'judge_rewards',
  'outcome_rewards',
  'recommender_reference',
  'reference_trajectory',
  'segment_rewards',
  'self_diagnosis_messages',
  'self_written_reference',
  'stage_weight',
  'teacher_messages',
  'teacher_student_log_probs',
  'token_advantages',
  'user_reference',
]
