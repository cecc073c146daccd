"""Training the agents' adapters: the SFT warm start that teaches a model the dialogue protocol before RL."""

from coars_jax.training.warm_start import (DialogueScript, SFTExamples, ScriptedAgents, TrainResult,
                                           WarmStartConfig, WarmStartResult, dialogue_script, draw_windows,
                                           evaluate_dialogues, load_warm_start, make_batch, prepare_model,
                                           save_warm_start, scripted_dialogues, scripted_user_reaction, sft_loss,
                                           train_sft, warm_start_agents)

__all__ = [
    'DialogueScript', 'SFTExamples', 'ScriptedAgents', 'TrainResult', 'WarmStartConfig', 'WarmStartResult',
    'dialogue_script', 'draw_windows', 'evaluate_dialogues', 'load_warm_start', 'make_batch', 'prepare_model',
    'save_warm_start', 'scripted_dialogues', 'scripted_user_reaction', 'sft_loss', 'train_sft', 'warm_start_agents',
]
