"""Training the agents' adapters: the SFT warm start that teaches a model the dialogue protocol before RL, and the
co-evolving RL trainer (`rl`); `experiment` runs either end to end from a config."""

from coars_jax.training.rl import (NonFiniteUpdateError, RLConfig, RLTrainer, TrainerState, judge_probabilities,
                                   rollout_rewards, teacher_prompts, windows_at)
from coars_jax.training.warm_start import (DialogueScript, SFTExamples, ScriptedAgents, TrainResult,
                                           WarmStartConfig, WarmStartResult, dialogue_script, draw_windows,
                                           evaluate_dialogues, load_warm_start, make_batch, prepare_model,
                                           save_warm_start, scripted_dialogues, scripted_user_reaction, sft_loss,
                                           train_sft, warm_start_agents)

__all__ = [
    'DialogueScript', 'NonFiniteUpdateError', 'RLConfig', 'RLTrainer', 'SFTExamples', 'ScriptedAgents',
    'TrainResult', 'TrainerState', 'WarmStartConfig', 'WarmStartResult', 'dialogue_script', 'draw_windows',
    'evaluate_dialogues', 'judge_probabilities', 'load_warm_start', 'make_batch', 'prepare_model',
    'rollout_rewards', 'save_warm_start', 'scripted_dialogues', 'scripted_user_reaction', 'sft_loss',
    'teacher_prompts', 'train_sft', 'warm_start_agents', 'windows_at',
]
