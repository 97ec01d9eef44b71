"""driml_pl: DRIML (Mazoure et al., NeurIPS 2020) -- C51 plus an InfoNCE auxiliary loss -- on Procgen, in Lightning.

Data flow::

    conf/*.yaml -> LightningCLI -> DRIMLDataModule + DRIML (LightningModule) + Trainer

    ProcgenVecEnv --(epsilon-greedy on DRIML.act)--> Collector --> FrameReplay (uint8 ring per env)
                                                                      |
                          ReplayStream (IterableDataset, main process) | one vectorised sample per batch:
                                                                      v  s_t, a_t, R^(n), gamma^n(1-d), s_{t+n}, s_{t+k}
    DRIML.training_step: C51 cross-entropy(projected target from the target net)
                         + sum_terms lambda * InfoNCE(critic(s_t, a_t), critic(s_{t+k}))
    Lightning: backward, grad-norm clip, Adam step; DRIML syncs the target every `target_update_interval` updates.
"""

__version__ = "0.1.0"
