"""fdg_jax: fully decoupled training with delayed gradients (FDG) in JAX/Flax.

The packages show the architecture: `engine` (the schedule, the stage functions, the methods,
the executor, placement and transfers, optimizers, compensation, checkpoints, timelines),
`models` (the zoo, the GPT and ViT, DGL's heads, the split), `data` (image and text sources and
their batch streams), `tasks` (one module per task behind `tasks.base.Task`) and `trainer` (the
config, the run, its workdir and logs); `main`, `sample` and `launch` are the commands. Each
package's `__init__` states its import rule; tests/test_layout.py checks them.

The library's API is here: `fdg_jax.Pipeline` on any list of flax modules, the zoo
(`fdg_jax.models`), the split (`fdg_jax.partition`), DGL's heads (`fdg_jax.aux_heads`), the
comparison methods (`fdg_jax.baselines`, `fdg_jax.methods`), optimizers described as data
(`fdg_jax.optimizers`) and stale-gradient compensation (`fdg_jax.compensation`). This module
imports the engine and the models only: the library needs no trainer dependencies.
"""

from fdg_jax.engine import baselines
from fdg_jax.engine import compensation
from fdg_jax.engine import methods
from fdg_jax.engine import optimizers
from fdg_jax import models
from fdg_jax.engine.pipeline import (Pipeline, PipelineState, TrainState, cross_entropy_loss,
                                     delay, stage_betas)
from fdg_jax.models import aux_heads
from fdg_jax.models import partition

__all__ = ['Pipeline', 'PipelineState', 'TrainState', 'aux_heads', 'baselines', 'compensation',
           'cross_entropy_loss', 'delay', 'methods', 'models', 'optimizers', 'partition',
           'stage_betas']
