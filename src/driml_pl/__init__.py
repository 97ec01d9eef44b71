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

import os as _os

__version__ = "0.1.0"

# OpenMP threads (torch's intra-op pool) that wait passively sleep instead of spinning: two runs on one machine (or
# one beside other work) then share the cores instead of spinning against each other (docs/threads.md). libgomp reads
# this once, when torch is first imported, so it is set here, before any driml_pl module imports torch. A setting of
# the caller's (OMP_WAIT_POLICY or GOMP_SPINCOUNT) is kept.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
