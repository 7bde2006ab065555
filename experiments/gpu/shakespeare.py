"""Part 4, shakespeare: nanoGPT's shakespeare_char recipe (configs/shakespeare_char.py: the GPU
GPT, dropout 0.2, AdamW lr 1e-3 -> 1e-4 cosine over 5000 steps after 100 of warm-up, beta2 0.99,
weight decay 0.1, clipping 1.0) with BP, then FDG K = 2, on device 0, each for as many steps as
fit in its half of the time left (FDG stops at BP's step count, so the curves line up);
validation loss over the whole validation text every --lm_eval_every steps and at the end."""

import dataclasses
import time
import traceback
from typing import Callable

from absl import flags
import jax

from experiments.gpu import record as record_lib
from experiments.gpu import workloads
from fdg_jax.data import text_data
from fdg_jax.trainer import prefetch

NANOGPT = {'best_val_loss': 1.4697, 'minutes': 3, 'device': 'one A100',
           'source': "nanoGPT's README, config/train_shakespeare_char.py"}

flags.DEFINE_string('data', None, 'tinyshakespeare.txt (or any UTF-8 text) for the shakespeare '
                    'part; without it that part fails and the others run.')
flags.DEFINE_integer('lm_steps', 5000, 'Most steps of each shakespeare run.')
flags.DEFINE_integer('lm_decay_steps', 5000, "Where the learning rate's cosine ends (nanoGPT: "
                     '5000); lower it to finish a schedule in the time.')
flags.DEFINE_integer('lm_eval_every', 250, 'Steps between validation losses (nanoGPT: 250).')
flags.DEFINE_enum('lm_dtype', 'bfloat16', ['float32', 'bfloat16'], "The GPT's compute dtype in "
                  'the shakespeare part (parameters stay float32).')
FLAGS = flags.FLAGS


def merge(total, metrics):
  return metrics if total is None else total if metrics is None else total.merge(metrics)


def train_lm(data, method: str, num_stages: int, seconds: float, max_steps: int,
             on_evaluation: Callable[[], None], run: dict) -> None:
  """nanoGPT's recipe for at most `max_steps` steps or about `seconds`; fills `run` as it goes
  (validation loss every --lm_eval_every steps and at the end, after draining the pipeline)."""
  start = time.monotonic()
  size = workloads.sizes().gpt_gpu
  model = workloads.gpt_model('shakespeare', size, data.vocabulary.size, FLAGS.lm_dtype,
                              FLAGS.lm_decay_steps)
  pipe, state, split = workloads.make_pipeline(model, num_stages,
                                               workloads.on_one_device(num_stages))
  run.update(model=model.label, split=list(split), curve=[])
  batches = prefetch.prefetch_to_device(
      text_data.train_batches(data, size.batch_size, size.block_size, seed=0), 2,
      (pipe.shardings[0], pipe.shardings[-1]))
  warm_steps = 2 * num_stages + 3   # compiles every phase; steps/s counts from here
  paused_s, last_pause_s, metrics, step = 0.0, 0.0, None, 0
  try:
    while step < max_steps:
      state, info = pipe.step(state, *next(batches))
      step += 1
      metrics = merge(metrics, info.metrics)
      if step == warm_steps:
        jax.block_until_ready(state)
        timed_from, paused_s = time.monotonic(), 0.0
      out_of_time = time.monotonic() - start + 2 * last_pause_s + 1 > seconds
      last = out_of_time or step == max_steps
      if step % FLAGS.lm_eval_every and not last:
        continue
      jax.block_until_ready(state)
      if step > warm_steps:   # training alone: no compilation, evaluation or drain
        run['steps_per_sec'] = round(
            (step - warm_steps) / (time.monotonic() - timed_from - paused_s), 2)
        run['tokens_per_sec'] = round(run['steps_per_sec'] * size.batch_size * size.block_size)
      begin = time.monotonic()
      if last:   # every batch fed reaches every stage's update
        state, drained = pipe.drain(state)
        for item in drained:
          metrics = merge(metrics, item.metrics)
      result = pipe.evaluate(state, text_data.eval_batches(
          data, workloads.sizes().eval_batch, size.block_size,
          workloads.sizes().eval_max_batches))
      last_pause_s = time.monotonic() - begin
      paused_s += last_pause_s
      train_loss = None if metrics is None else float(metrics.compute()['loss'])
      metrics = None
      run['curve'].append({'step': step, 'val_loss': round(result['loss'], 4),
                           'train_loss': None if train_loss is None else round(train_loss, 4),
                           'seconds': round(time.monotonic() - start, 1)})
      run['steps'] = step
      run['best_val_loss'] = min(point['val_loss'] for point in run['curve'])
      print(f"  {method} K={num_stages} step {step}: val loss {result['loss']:.4f}, "
            f"{run.get('steps_per_sec')} steps/s, {run['curve'][-1]['seconds']} s", flush=True)
      on_evaluation()
      if last:
        break
  finally:
    batches.close()
  run['seconds'] = round(time.monotonic() - start, 1)


def shakespeare(record: dict, budget: record_lib.Budget, report: record_lib.Report) -> None:
  size = workloads.sizes().gpt_gpu
  if not FLAGS.data:
    raise ValueError('The shakespeare part needs --data=PATH of tinyshakespeare.txt.')
  data = text_data.load_text('textfile', FLAGS.data, block_size=size.block_size)
  record.update(data=data.description, nanogpt=NANOGPT, dtype=FLAGS.lm_dtype,
                recipe=dict(dataclasses.asdict(size), lr='1e-3 -> 1e-4 cosine',
                            warmup_steps=100, decay_steps=FLAGS.lm_decay_steps, beta2=0.99,
                            weight_decay=0.1, grad_clip=1.0, eval_every=FLAGS.lm_eval_every),
                runs=[])
  max_steps = FLAGS.lm_steps
  methods = [('bp', 1), ('fdg', 2)]
  for i, (method, num_stages) in enumerate(methods):
    run = {'method': method, 'stages': num_stages}
    record['runs'].append(run)
    try:
      train_lm(data, method, num_stages, budget.left() / (len(methods) - i), max_steps,
               report.save, run)
    except Exception:  # pylint: disable=broad-except
      run['error'] = traceback.format_exc(limit=-4)
      record['failed'] = record.get('failed', 0) + 1
    report.save()
    max_steps = min(max_steps, run.get('steps') or max_steps)   # the same points of the curve


def markdown(part: dict) -> list[str]:
  runs = part.get('runs', [])
  lines = [f"{part.get('data')}; nanoGPT: {NANOGPT['best_val_loss']} in about "
           f"{NANOGPT['minutes']} min on {NANOGPT['device']}.", ''] + record_lib.table(
               ['method', 'K', 'steps', 'steps/s', 'tokens/s', 'best val loss', 'seconds'],
               [[r['method'], r['stages'], r.get('steps'), r.get('steps_per_sec'),
                 r.get('tokens_per_sec'), r.get('best_val_loss'), r.get('seconds')]
                for r in runs])
  curves = {r['method']: {p['step']: p['val_loss'] for p in r.get('curve', [])} for r in runs}
  steps = sorted({step for curve in curves.values() for step in curve})
  lines += record_lib.table(['step'] + [f'{m} val loss' for m in curves],
                            [[step] + [curve.get(step) for curve in curves.values()]
                             for step in steps])
  for r in runs:
    if r.get('error'):
      lines += [f"{r['method']}: " + r['error'].strip().splitlines()[-1], '']
  return lines
