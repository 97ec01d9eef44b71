"""driml_pl: DRIML (Mazoure et al., NeurIPS 2020) -- C51 plus an InfoNCE auxiliary loss -- on Procgen, in Lightning.

Data flow (docs/architecture.md has the rooms and seams)::

    conf/*.yaml -> LightningCLI (cli.py) -> DRIMLDataModule + DRIML (LightningModule) + Trainer + RunCheckpoint

    VecEnv (driml_pl.envs) --(epsilon-greedy on the actors' snapshot, ActorSnapshot.act)--> Collector --> FrameReplay
                                                                                     (uint8 ring per env)
    ReplayStream (IterableDataset, main process): env steps to hold the replay ratio, then one vectorised sample per
        minibatch (s_t, a_t, R^(n), gamma^n(1-d), s_{t+n}, s_{t+k}, k); one StepBatch of minibatches per Lightning step
    DRIML.training_step -> update (manual optimisation, learner/update.py), per minibatch:
        C51 cross-entropy(projected target from the target net) + sum_terms lambda * InfoNCE(critic(s_t, a_t),
        critic(s_{t+k})) [+ DRIML-ada's pair loss] -> backward -> global-norm clip -> Adam; the target is copied every
        `target_update_interval` updates, the actors' snapshot once per Lightning step.
"""

import os as _os

__version__ = "0.1.0"

# OpenMP threads (torch's intra-op pool) that wait passively sleep instead of spinning: two runs on one machine (or
# one beside other work) then share the cores instead of spinning against each other (docs/threads.md). libgomp reads
# this once, when torch is first imported, so it is set here, before any driml_pl module imports torch. A setting of
# the caller's (OMP_WAIT_POLICY or GOMP_SPINCOUNT) is kept.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
