"""Sampling from a GPT: the key-value cache against uncached generation token for token
(fdg_jax.models.sampling), the training-time samples of the language-model task, and
`python -m fdg_jax.sample` on runs of every kind (slow: they train through the trainer)."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdg_jax import sample
from fdg_jax.data import text_data
from fdg_jax.engine import checkpoint
from fdg_jax.engine import pipeline
from fdg_jax.models import gpt
from fdg_jax.models import partition
from fdg_jax.models import sampling
from fdg_jax.tasks import language_model
from fdg_jax.trainer import train
from fdg_jax.trainer import workdir as workdir_lib
from test_language_model import tiny_config, write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, VOCAB = 2, 2, 16, 8, 11


def _gpt(dtype='float32', seed=0, implementation=None):
  """A tiny GPT's blocks and variables, perturbed so that every token is likely."""
  blocks = gpt.create_blocks(N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, VOCAB, bias=True, dtype=dtype,
                             implementation=implementation)
  model = partition.StageModule(tuple(blocks))
  variables = model.init(jax.random.key(seed), jnp.zeros((1, BLOCK_SIZE), jnp.int32),
                         train=False)
  rng = np.random.default_rng(seed)
  return blocks, jax.tree.map(
      lambda a: a + rng.normal(scale=0.5, size=a.shape).astype(a.dtype), variables)


@pytest.mark.parametrize('implementation', [None, 'xla'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_cached_generation_equals_uncached_token_for_token(dtype, implementation):
  """Prompts shorter and longer than the context, generation past it, with and without top-k:
  the cache changes the cost, never a token (the attention written out, as on CPUs, and
  through `jax.nn.dot_product_attention`, as on GPUs)."""
  blocks, variables = _gpt(dtype, implementation=implementation)
  sampler = sampling.Sampler(blocks)
  rng = np.random.default_rng(3)
  for length, top_k in ((1, None), (3, 4), (BLOCK_SIZE + 3, None)):
    prompts = rng.integers(0, VOCAB, (3, length))
    runs = [sampler.generate(variables, prompts, 2 * BLOCK_SIZE, temperature=0.9, top_k=top_k,
                             rng=np.random.default_rng(7), use_cache=use_cache)
            for use_cache in (True, False)]
    assert runs[0].shape == (3, length + 2 * BLOCK_SIZE)
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0][:, :length], prompts)
    assert len(np.unique(runs[0][:, length:])) > 3   # drawn, not stuck on one token


def test_the_cache_holds_the_logits_of_the_whole_model():
  """Each position's logits through the cache (a prefill, then one token at a time) are the
  unsplit model's on the whole window."""
  blocks, variables = _gpt()
  sampler = sampling.Sampler(blocks)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, BLOCK_SIZE)).astype(np.int32)
  full = partition.StageModule(tuple(blocks)).apply(variables, tokens, train=False)
  decode = sampler._decode   # pylint: disable=protected-access
  logits, cache = decode(variables, sampler.empty_cache(2), tokens[:, :3])
  cached = [logits]
  for t in range(3, BLOCK_SIZE):
    logits, cache = decode(variables, cache, tokens[:, t:t + 1])
    cached.append(logits)
  np.testing.assert_allclose(np.stack(cached, axis=1), full[:, 2:], rtol=1e-5, atol=1e-5)
  # The decode blocks take the training parameters as they are: no other parameter.
  decoder = partition.StageModule(tuple(sampling.decoding(blocks)))
  shapes = jax.eval_shape(lambda: decoder.init(jax.random.key(0), tokens, train=False))
  assert jax.tree.structure(shapes['params']) == jax.tree.structure(variables['params'])
  assert set(shapes) == {'params', 'cache'}


def test_draw_keeps_the_top_k_and_follows_the_temperature():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  rng = np.random.default_rng(0)
  assert set(sampling.draw(logits, 1.0, 1, rng)) == {0}
  top2 = sampling.draw(logits, 1.0, 2, rng)
  assert set(top2) == {0, 1} and abs(np.mean(top2 == 0) - 0.5 / 0.8) < 0.03
  hot = sampling.draw(logits, 1.0, None, rng)
  assert abs(np.mean(hot == 3) - 0.05) < 0.015
  cold = sampling.draw(logits, 0.25, None, rng)   # p ** 4, renormalised
  assert abs(np.mean(cold == 0) - 0.5 ** 4 / (0.5 ** 4 + 0.3 ** 4 + 0.15 ** 4 + 0.05 ** 4)) < 0.03


def test_training_time_samples_are_the_cached_samples_of_the_composed_stages(tmp_path):
  """The task's `generate` on a pipeline in flight (two stages) gives the text that the old
  per-token `pipe.predict` generation, written here as the reference, gives."""
  blocks, variables = _gpt()
  split = (2,)
  stage_variables = [{'params': v['params'], 'batch_stats': {}}
                     for v in partition.split_variables(variables, split, len(blocks))]
  pipe = pipeline.Pipeline(partition.build_stages(blocks, split), optax.sgd(0.1),
                           pipeline.cross_entropy_loss, placements=jax.devices()[:2])
  tokens = np.zeros((2, BLOCK_SIZE), np.int32)
  state = pipe.init(jax.random.key(1), tokens, variables=stage_variables)
  state, _ = pipe.step(state, tokens, tokens)   # a batch in flight: predict ignores it
  vocabulary = text_data.Vocabulary('char', 'abcdefghijk')
  text = language_model.generate(pipe, state, vocabulary, 'abc', 20, 0.8, seed=5, top_k=None)

  rng, ids = np.random.default_rng(5), list(vocabulary.encode('abc'))
  window = np.zeros((1, BLOCK_SIZE), np.int32)
  for _ in range(20):   # the reference: the context re-encoded for every token
    context = ids[-BLOCK_SIZE:]
    window[0, :] = 0
    window[0, :len(context)] = context
    row = np.asarray(pipe.predict(state, window))[0, len(context) - 1].astype(np.float64)
    row = (row - row.max()) / 0.8
    ids.append(int(rng.choice(VOCAB, p=np.exp(row) / np.exp(row).sum())))
  assert text == vocabulary.decode(ids) and len(text) == 23


def _workdir(tmp_path, **fields):
  """A language-model workdir holding only its config.json."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = tiny_config(write_text(tmp_path / 'text.txt'), **fields)
  workdir_lib.write_json(str(workdir / workdir_lib.CONFIG_FILE), workdir_lib.jsonable(config))
  return workdir, config


def test_workdirs_without_a_run_vocabulary_or_checkpoint_give_one_line(tmp_path):
  with pytest.raises(sample.SampleError, match='does not exist'):
    sample.load_model(str(tmp_path / 'missing'))
  with pytest.raises(sample.SampleError, match='has no config.json: not the workdir of a run'):
    sample.load_model(str(tmp_path))
  workdir, config = _workdir(tmp_path)
  with pytest.raises(sample.SampleError, match='has no vocabulary.json.*until a checkpoint'):
    sample.load_model(str(workdir))
  language_model.LanguageModel(config).load_data(str(workdir))   # stores the vocabulary
  with pytest.raises(sample.SampleError, match='has no checkpoint yet. Train the run'):
    sample.load_model(str(workdir))
  image = tmp_path / 'image'
  image.mkdir()
  (image / workdir_lib.CONFIG_FILE).write_text(json.dumps({'task': 'image_classification'}))
  with pytest.raises(sample.SampleError, match='holds a image_classification run'):
    sample.load_model(str(image))


def test_run_config_fills_the_fields_added_since_and_tuples(tmp_path):
  workdir, _ = _workdir(tmp_path, stage_devices=(0,))
  saved = json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())
  del saved['vocabulary_from'], saved['microbatches']   # a run from before these fields
  (workdir / workdir_lib.CONFIG_FILE).write_text(json.dumps(saved))
  config = sample.run_config(str(workdir))
  assert config.vocabulary_from == 'train' and config.microbatches == 1
  assert config.stage_devices == (0,)


def test_start_from_a_file(tmp_path):
  prompt = tmp_path / 'prompt.txt'
  prompt.write_text('ROMEO:\n', encoding='utf-8')
  assert sample.read_start(f'FILE:{prompt}') == 'ROMEO:\n'
  assert sample.read_start('JULIET:') == 'JULIET:'
  with pytest.raises(sample.SampleError, match='cannot read .*missing.txt'):
    sample.read_start(f'FILE:{tmp_path / "missing.txt"}')


def _load(workdir, **kwargs):
  with contextlib.redirect_stderr(io.StringIO()):
    return sample.load_model(str(workdir), **kwargs)


def _sample_command(workdir, *flags):
  # The command simulates the devices the run used itself; conftest's other flags stay.
  env = dict(os.environ, XLA_FLAGS=' '.join(
      f for f in os.environ.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count')))
  return subprocess.run([sys.executable, '-m', 'fdg_jax.sample', f'--workdir={workdir}', *flags],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sample_command_on_a_trained_fdg_run(tmp_path):
  """FDG K = 2 trained through the trainer: the command restores it, completes its batches in
  flight (the summary's params_digest) and prints the cached samples, which equal uncached
  generation from those variables."""
  text = write_text(tmp_path / 'text.txt')
  workdir = tmp_path / 'run'
  summary = train.train_and_evaluate(tiny_config(text, steps=12), str(workdir))
  _, vocabulary, blocks, variables, note = _load(workdir)
  assert train.params_digest(variables) == summary['params_digest']
  assert note == 'fdg K=2, step 12, its batches in flight completed'
  result = _sample_command(workdir, '--start=The ', '--num_samples=2', '--max_new_tokens=30',
                           '--top_k=5', '--seed=3')
  assert result.returncode == 0, result.stderr[-3000:]
  samples = result.stdout.split('---------------\n')
  assert len(samples) == 3 and samples[2] == ''
  expected = sampling.Sampler(blocks).generate(
      variables, np.tile(vocabulary.encode('The '), (2, 1)), 30, temperature=0.8, top_k=5,
      rng=np.random.default_rng(3), use_cache=False)
  assert [s[:-1] for s in samples[:2]] == [vocabulary.decode(row) for row in expected]
  assert 'Sampling' in result.stderr and 'its batches in flight completed' in result.stderr
  # Without the training text: the stages as checkpointed, said in one line.
  _, _, _, as_saved, note = _load(workdir, data_dir=str(tmp_path / 'moved.txt'))
  assert note == 'fdg K=2, step 12, as checkpointed'
  assert train.params_digest(as_saved) != summary['params_digest']
  result = _sample_command(workdir, '--start=Zebra', '--max_new_tokens=3')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: --start has the character 'Z'")


@pytest.mark.slow
@pytest.mark.parametrize('fields', [
    dict(method='dgl'),
    dict(method='fdg', microbatches=2, num_stages=3, n_layer=3),
    dict(method='bp', data_parallel=2, stage_devices=()),
], ids=['dgl', 'fdg-microbatches', 'bp-data-parallel'])
def test_runs_of_every_kind_are_restored_to_their_final_variables(tmp_path, fields):
  text = write_text(tmp_path / 'text.txt')
  summary = train.train_and_evaluate(tiny_config(text, steps=8, **fields), str(tmp_path / 'run'))
  assert checkpoint.written_by(str(tmp_path / 'run')) == checkpoint.ONE_PROCESS
  variables = _load(tmp_path / 'run')[3]
  assert train.params_digest(variables) == summary['params_digest']


@pytest.mark.slow
def test_a_run_of_two_processes_is_sampled_in_one(tmp_path):
  """FDG K = 2 in two processes (stage k on process k): each process's checkpoint files are
  joined here, in one process, to the run's final variables."""
  text = write_text(tmp_path / 'text.txt')
  workdir = tmp_path / 'run'
  overrides = {**{k: v for k, v in tiny_config(text, steps=8).items()
                  if k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size',
                           'eval_batch_size', 'eval_max_batches', 'sample_tokens',
                           'log_every_steps', 'warmup_steps', 'num_train_steps',
                           'lr_decay_steps', 'eval_every_steps', 'dataset', 'data_dir')},
               'stage_devices': '()'}
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR='')   # as tests/test_multiprocess.py
  launcher = subprocess.Popen(
      [sys.executable, '-m', 'fdg_jax.launch', '--num_processes=2', '--',
       '--config=configs/shakespeare_char_cpu.py', f'--workdir={workdir}',
       *[f'--config.{k}={v}' for k, v in overrides.items()]],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)
  try:
    output, _ = launcher.communicate(timeout=400)
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
      launcher.wait(timeout=10)
  assert launcher.returncode == 0, output[-3000:]
  assert checkpoint.written_by(str(workdir)) == checkpoint.PROCESSES
  summary = json.loads((workdir / workdir_lib.SUMMARY_FILE).read_text())
  assert summary['num_processes'] == 2
  _, _, _, variables, note = _load(workdir)
  assert note == 'fdg K=2, step 8, its batches in flight completed'
  assert train.params_digest(variables) == summary['params_digest']
