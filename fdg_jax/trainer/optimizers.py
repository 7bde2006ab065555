"""The config's optimizer and learning-rate schedule: fields in, an engine `Recipe` out.

* `config.optimizer`: 'sgd' (the paper's CIFAR recipe), 'adamw' (nanoGPT's), 'muon' (Muon on
  the hidden layers' matrices at muon_learning_rate, that AdamW at learning_rate on the rest) or
  'rotated_adamw' (that AdamW run in a rotated basis on the attention and MLP matrices, with the
  rotation_* fields); the Recipe says what each is (`fdg_jax.engine.optimizers`).
* `config.lr_schedule`: 'piecewise' (warm-up for warmup_epochs, then learning_rate multiplied by
  lr_decay_factor at each of lr_boundaries_epochs) or 'warmup_cosine' (nanoGPT's `get_lr`, in
  steps: `optimizers.warmup_cosine_schedule`).
* `config.grad_clip` > 0: each stage's gradient clipped by its own global norm (the whole
  model's with one stage).

`recipe(config, steps_per_epoch)` is read once per run, by the trainer; its `learning_rate` is
the run's schedule (Muon's is the same schedule scaled by muon_learning_rate / learning_rate),
and the compensations rebuild from the same Recipe. `validate(config)` lists what is wrong with
these fields, before any compute.
"""

import optax

from fdg_jax.engine import compensation
from fdg_jax.engine import optimizers

LR_SCHEDULES = ('piecewise', 'warmup_cosine')


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate of each optimizer step: config.lr_schedule's schedule."""
  if config.lr_schedule == 'warmup_cosine':
    return optimizers.warmup_cosine_schedule(config.learning_rate, config.min_learning_rate,
                                             config.warmup_steps, config.lr_decay_steps)
  return piecewise_schedule(config, steps_per_epoch)


def piecewise_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """Warm-up, then learning_rate divided at each boundary (in optimizer steps).

  Warm-up lasts warmup_epochs: at warmup_lr throughout (warmup_shape 'constant', the paper's),
  or rising in a straight line from warmup_lr at step 0 to learning_rate at its end ('linear',
  Goyal et al., 2017), which gives SGD without momentum the ramp that momentum's build-up gives.
  """
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  boundaries = {int(round(epoch * steps_per_epoch)) - warmup_steps: config.lr_decay_factor
                for epoch in config.lr_boundaries_epochs}
  main = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  if not warmup_steps:
    return main
  warmup = (optax.constant_schedule(config.warmup_lr) if config.warmup_shape == 'constant' else
            optax.linear_schedule(config.warmup_lr, config.learning_rate, warmup_steps))
  return optax.join_schedules([warmup, main], [warmup_steps])


def recipe(config, steps_per_epoch: int) -> optimizers.Recipe:
  """config's optimizer, with its schedule (`learning_rate_schedule`) as its learning rate."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  if config.optimizer in ('adamw', 'muon', 'rotated_adamw'):
    def mask(params):
      return optimizers.weight_decay_mask(params, config.decay_embeddings)

    def muon_schedule(count):   # the run's schedule, peaking at muon_learning_rate
      return schedule(count) * (config.muon_learning_rate / config.learning_rate)

    extra = {}   # the fields only Muon or the rotation reads
    if config.optimizer == 'muon':
      extra = dict(muon_learning_rate=muon_schedule, muon_momentum=config.muon_momentum,
                   muon_nesterov=config.muon_nesterov, muon_ns_steps=config.muon_ns_steps,
                   muon_weight_decay=config.muon_weight_decay)
    if config.optimizer == 'rotated_adamw':
      extra = dict(rotation_frequency=config.rotation_frequency,
                   rotation_decay=config.rotation_decay,
                   rotation_geometry=config.rotation_geometry)
    return optimizers.Recipe(
        config.optimizer, schedule, weight_decay=config.weight_decay, b1=config.adam_b1,
        b2=config.adam_b2, eps=config.adam_eps, decay_mask=mask, grad_clip=config.grad_clip,
        **extra)
  return optimizers.Recipe('sgd', schedule, momentum=config.momentum,
                           weight_decay=config.weight_decay, grad_clip=config.grad_clip)


# ---------------------------------------------------------------- checks


def validate(config) -> list[str]:
  """One message per bad optimizer or schedule field ('config.FIELD: problem. Fix.')."""
  errors = []

  def fail(field, problem, fix):
    errors.append(f'config.{field}: {problem}. {fix}')

  if config.optimizer not in optimizers.OPTIMIZERS:
    fail('optimizer', f'unknown optimizer {config.optimizer!r}',
         f'Choose one of {optimizers.OPTIMIZERS}.')
  if config.lr_schedule not in LR_SCHEDULES:
    fail('lr_schedule', f'unknown schedule {config.lr_schedule!r}',
         f'Choose one of {LR_SCHEDULES}.')
  if not 0 <= config.adam_b1 < 1:
    fail('adam_b1', f'{config.adam_b1} is outside [0, 1)', 'Use e.g. 0.9.')
  if not 0 < config.adam_b2 < 1:
    fail('adam_b2', f'{config.adam_b2} is outside (0, 1)', 'Use e.g. 0.95 or 0.99.')
  if not config.adam_eps > 0:
    fail('adam_eps', f'{config.adam_eps} is not positive', 'Use e.g. 1e-8.')
  if config.weight_decay < 0:
    fail('weight_decay', f'{config.weight_decay} is negative', 'Use 0 or more.')
  if config.momentum < 0:
    fail('momentum', f'{config.momentum} is negative', 'Use 0 (plain SGD) or e.g. 0.9.')
  if config.optimizer == 'muon':
    if not config.muon_learning_rate > 0:
      fail('muon_learning_rate', f'{config.muon_learning_rate} is not positive',
           'Use e.g. 0.02 (Keller Jordan\'s Muon).')
    if not 0 <= config.muon_momentum < 1:
      fail('muon_momentum', f'{config.muon_momentum} is outside [0, 1)', 'Use e.g. 0.95.')
    if config.muon_ns_steps < 1:
      fail('muon_ns_steps', f'{config.muon_ns_steps} Newton-Schulz steps', 'Use e.g. 5.')
    if config.muon_weight_decay < 0:
      fail('muon_weight_decay', f'{config.muon_weight_decay} is negative', 'Use 0 or more.')
  if (config.optimizer in ('muon', 'rotated_adamw')
      and config.compensation in compensation.REBUILDS_OPTIMIZER):
    fail('compensation', f'{config.compensation!r} rebuilds the delayed stages\' optimizer as '
         f'SGD or AdamW with another momentum, which is not defined for {config.optimizer!r}',
         "Use --config.optimizer=adamw, or compensation 'weight_prediction', "
         f"'delay_compensation', 'lr_reschedule' or 'error_feedback' with {config.optimizer!r}.")
  if config.grad_clip < 0:
    fail('grad_clip', f'{config.grad_clip} is negative',
         'Use a positive global norm (e.g. 1.0), or 0 to turn clipping off.')
  if config.lr_schedule == 'warmup_cosine':
    if config.warmup_steps < 0:
      fail('warmup_steps', f'{config.warmup_steps} is negative', 'Use 0 or more steps.')
    if config.lr_decay_steps <= config.warmup_steps:
      fail('lr_decay_steps', f'{config.lr_decay_steps} is not after warmup_steps='
           f'{config.warmup_steps}', 'Use the step where the cosine ends, e.g. the run length.')
    if not 0 <= config.min_learning_rate <= config.learning_rate:
      fail('min_learning_rate', f'{config.min_learning_rate} is outside [0, learning_rate='
           f'{config.learning_rate}]', 'Use e.g. learning_rate / 10 (nanoGPT).')
    if config.warmup_epochs:
      fail('warmup_epochs', f"{config.warmup_epochs} is the 'piecewise' schedule's warm-up",
           "'warmup_cosine' warms up for warmup_steps: set --config.warmup_epochs=0.")
  elif config.warmup_steps:
    fail('warmup_steps', f"{config.warmup_steps} is the 'warmup_cosine' schedule's warm-up",
         "'piecewise' warms up for warmup_epochs: set --config.warmup_steps=0, or "
         "--config.lr_schedule=warmup_cosine.")
  return errors
