"""fdg_jax: fully decoupled training with delayed gradients (FDG) in JAX/Flax."""

from fdg_jax import baselines
from fdg_jax import compensation
from fdg_jax import models
from fdg_jax import partition
from fdg_jax.pipeline import Pipeline, PipelineState, TrainState, cross_entropy_loss, delay

__all__ = ['Pipeline', 'PipelineState', 'TrainState', 'baselines', 'compensation',
           'cross_entropy_loss', 'delay', 'models', 'partition']
