"""Evaluation-only runs (config.eval_only) and runs that start from another run's network
(config.init_from), both tasks: the numbers they must reproduce, what they leave untouched, and
the one-line refusals before any compute."""

import json
import os

import chex
import jax
import numpy as np
import optax
import pytest

from fdg_jax import data
from fdg_jax import sample
from fdg_jax.data import text_data
from fdg_jax.engine import checkpoint
from fdg_jax.models import partition
from fdg_jax.tasks import language_model
from fdg_jax.trainer import configuration
from fdg_jax.trainer import train
from fdg_jax.trainer import workdir as workdir_lib
from test_language_model import WORDS, tiny_config, write_text
from test_train import small_config, write_image_folder


def _files(workdir):
  """Every file of a workdir but log.txt, with its bytes."""
  found = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      if name != workdir_lib.LOG_FILE:
        with open(path, 'rb') as f:
          found[os.path.relpath(path, workdir)] = f.read()
  return found


def _fake_run(workdir, config, vocabulary=None, checkpoint_step=None):
  """A workdir as a run leaves it, without training: its config.json, a vocabulary and an
  (empty) checkpoint folder, which is all the checks before any compute look at."""
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_json(os.path.join(workdir, workdir_lib.CONFIG_FILE),
                         workdir_lib.jsonable(config))
  if vocabulary is not None:
    vocabulary.save(workdir)
  if checkpoint_step is not None:
    os.makedirs(os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(checkpoint_step)))
  return str(workdir)


def write_words(path, words, lines=200, seed=1):
  """A second text, of other words (lower case): characters the first text holds, not all."""
  rng = np.random.default_rng(seed)
  path.write_text('\n'.join(' '.join(rng.choice(words, 8)) for _ in range(lines)),
                  encoding='utf-8')
  return str(path)


# ------------------------------------------------------------------ the language model


@pytest.fixture(scope='module')
def lm_source(tmp_path_factory):
  """FDG K = 2 trained 12 steps on a small text: (its config, workdir, summary)."""
  root = tmp_path_factory.mktemp('lm_source')
  config = tiny_config(write_text(root / 'text.txt'), steps=12, checkpoint_every_steps=5)
  workdir = str(root / 'run')
  return config, workdir, train.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_eval_only_reproduces_the_final_evaluation_of_a_language_model_run(lm_source):
  config, workdir, summary = lm_source
  before = _files(workdir)
  log_lines = open(os.path.join(workdir, workdir_lib.LOG_FILE)).read().count('\n')
  config = config.copy_and_resolve_references()
  config.eval_only = True
  evaluation = train.train_and_evaluate(config, workdir)
  # The final evaluation's numbers exactly, from the network it evaluated (the batches FDG had
  # in flight at the last checkpoint completed, as the trainer completes them).
  final = summary['history'][-1]
  for key in ('val_loss', 'val_bits_per_token', 'val_token_accuracy'):
    assert evaluation[key] == final[key], key
  assert evaluation['val_loss'] == summary['val_loss']
  assert evaluation['params_digest'] == summary['params_digest']
  assert evaluation['checkpoint_step'] == 12 and evaluation['eval_only']
  assert evaluation['restored'] == 'fdg K=2, step 12, its batches in flight completed'
  # Nothing of the run changed; the evaluation is its own file and lines appended to log.txt.
  after = _files(workdir)
  written = json.loads(after.pop(workdir_lib.EVAL_SUMMARY_FILE))
  assert written == evaluation
  assert after == before   # summary, config, checkpoints, events, samples, vocabulary
  log = open(os.path.join(workdir, workdir_lib.LOG_FILE)).read()
  assert log.count('\n') > log_lines and 'Evaluated the checkpoint (fdg K=2, step 12' in log
  # A resumable field (fewer evaluation batches) may change; the computation may not.
  config.eval_max_batches = 1
  assert train.train_and_evaluate(config, workdir)['val_loss'] != evaluation['val_loss']
  config.n_embd = 32
  with pytest.raises(configuration.ConfigError, match='different computation'):
    train.train_and_evaluate(config, workdir)


def _nll_of_windows(blocks, variables, tokens, block_size):
  """A naive reference of the evaluation: the composed model's mean next-token cross-entropy
  over `tokens`, each token after the first predicted once, by the first window that holds it
  (windows of block_size + 1 tokens at stride block_size, and one ending at the text's end)."""
  full = partition.StageModule(tuple(blocks))
  losses = {}
  starts = list(range(0, len(tokens) - block_size, block_size)) + [len(tokens) - block_size - 1]
  for start in starts:
    window = tokens[start:start + block_size + 1]
    logits = full.apply(variables, window[None, :-1], train=False)[0]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, window[1:])
    for i, value in enumerate(np.asarray(nll, np.float64)):
      losses.setdefault(start + 1 + i, value)
  assert sorted(losses) == list(range(1, len(tokens)))
  return float(np.mean(list(losses.values())))


@pytest.mark.slow
def test_init_from_fine_tunes_on_a_second_text_from_the_sources_network(lm_source, tmp_path):
  """A BP run started from the FDG run's network: exactly its final network (K and method
  differ), the source's vocabulary kept for a second text of fewer characters, its step-0 loss
  that of the source's network on that text; interrupted, it resumes as its own run."""
  source_config, source, source_summary = lm_source
  second = write_words(tmp_path / 'second.txt', WORDS[:8])
  config = tiny_config(second, steps=8, method='bp', init_from=source, learning_rate=3e-4,
                       eval_max_batches=0, checkpoint_every_steps=4, eval_every_steps=4)
  task = configuration.create_task(config)
  source_vocabulary = text_data.load_vocabulary(source)
  # What the trainer starts from: the source's final network (the summary's digest, computed
  # from the source's state in memory), split for one stage here.
  network, record = train.source_network(config, source_vocabulary.size)
  assert train.params_digest(network) == source_summary['params_digest']
  assert record == {'workdir': source, 'step': 12, 'method': 'fdg', 'num_stages': 2,
                    'completed': True}
  run = train.initial_run(config, task, source_vocabulary.size, 10, network=network)
  chex.assert_trees_all_equal(partition.merge_variables(
      run.pipe.gathered_variables(run.state), run.split, task.num_blocks()), network)
  assert run.split == () and len(run.state.stages) == 1

  workdir = str(tmp_path / 'fine')
  summary = train.train_and_evaluate(config, workdir)
  assert summary['init_from'] == {**record, 'params_digest': source_summary['params_digest']}
  assert summary['vocabulary_size'] == source_vocabulary.size
  assert text_data.load_vocabulary(workdir) == source_vocabulary
  assert [h['step'] for h in summary['history']] == [0, 4, 8]
  # Step 0: the source's network on the second text's validation part, in the source's ids.
  text = open(second, encoding='utf-8').read()
  own = text_data.Vocabulary.from_text(text)
  assert own != source_vocabulary and set(own.symbols) < set(source_vocabulary.symbols)
  val_ids = source_vocabulary.encode(text[int(len(text) * (1 - config.val_fraction)):])
  _, _, blocks, variables, _ = sample.load_model(source)
  expected = _nll_of_windows(blocks, variables, val_ids, config.block_size)
  assert summary['history'][0]['val_loss'] == pytest.approx(expected, rel=1e-5)
  assert summary['history'][-1]['val_loss'] < summary['history'][0]['val_loss']   # it learns
  assert summary['params_digest'] != source_summary['params_digest']
  saved = json.loads(open(os.path.join(workdir, workdir_lib.CONFIG_FILE)).read())
  assert saved['init_from'] == source
  assert 'Network from the run in' in open(os.path.join(workdir, workdir_lib.LOG_FILE)).read()

  # The same run, interrupted at step 4 and continued: its own checkpoint, not the source's.
  config.num_train_steps = 4
  interrupted = str(tmp_path / 'interrupted')
  train.train_and_evaluate(config, interrupted)
  config.num_train_steps = 8
  resumed = train.train_and_evaluate(config, interrupted)
  assert resumed['resumed_from_step'] == 4 and resumed['init_from'] == summary['init_from']
  assert resumed['params_digest'] == summary['params_digest']
  timeless = lambda entry: {k: v for k, v in entry.items() if k != 'train_s'}  # a clock
  assert timeless(resumed['history'][0]) == timeless(summary['history'][0])   # step 0, kept
  assert timeless(resumed['history'][-1]) == timeless(summary['history'][-1])


@pytest.mark.slow
def test_init_from_on_the_same_text_starts_at_the_sources_final_loss(lm_source, tmp_path):
  source_config, source, source_summary = lm_source
  config = source_config.copy_and_resolve_references()
  config.update(init_from=source, method='fdg', num_stages=3, num_train_steps=2,
                eval_every_steps=0, sample_tokens=0, stage_devices=(0,))
  summary = train.train_and_evaluate(config, str(tmp_path / 'fine'))
  assert summary['num_stages'] == 3
  assert summary['init_from']['params_digest'] == source_summary['params_digest']
  assert summary['history'][0]['step'] == 0
  assert summary['history'][0]['val_loss'] == pytest.approx(source_summary['val_loss'],
                                                             rel=1e-6)


# ------------------------------------------------------------------ image classification


@pytest.mark.slow
def test_eval_only_and_init_from_on_images(tmp_path):
  """ResNet-8, FDG K = 2 (BatchNorm statistics in the network): the evaluation reproduces the
  final test loss and error, and a BP run started from it begins at them."""
  config = small_config(dataset='imagefolder', data_dir=write_image_folder(tmp_path / 'data'),
                        cache_dir=str(tmp_path / 'cache'))
  source = str(tmp_path / 'source')
  summary = train.train_and_evaluate(config, source)
  evaluate = config.copy_and_resolve_references()
  evaluate.eval_only = True
  evaluation = train.train_and_evaluate(evaluate, source)
  assert evaluation['test_loss'] == summary['test_loss'] == summary['history'][-1]['test_loss']
  assert evaluation['test_error'] == summary['test_error']
  assert evaluation['params_digest'] == summary['params_digest']
  fine = config.copy_and_resolve_references()
  fine.update(init_from=source, method='bp', num_train_steps=2)
  started = train.train_and_evaluate(fine, str(tmp_path / 'fine'))
  assert started['init_from']['params_digest'] == summary['params_digest']
  assert started['history'][0]['step'] == 0
  assert started['history'][0]['test_loss'] == pytest.approx(summary['test_loss'], rel=1e-5)
  assert started['history'][0]['test_error'] == summary['test_error']


# ------------------------------------------------------------------ one line before any compute


def test_eval_only_without_a_checkpoint_is_one_line(tmp_path):
  config = tiny_config(write_text(tmp_path / 'text.txt'), eval_only=True)
  with pytest.raises(configuration.ConfigError,
                     match=r"^config.eval_only: --workdir '.*empty' holds no checkpoint to "
                           r'evaluate. Point --workdir at the workdir of a run that saved one'):
    train.train_and_evaluate(config, str(tmp_path / 'empty'))
  assert not (tmp_path / 'empty').exists()   # nothing written


def test_init_from_refusals_name_the_problem_and_the_fix(tmp_path):
  text = write_text(tmp_path / 'text.txt')
  source_config = tiny_config(text)
  vocabulary = language_model.LanguageModel(source_config).load_data().vocabulary
  source = _fake_run(tmp_path / 'source', source_config, vocabulary, checkpoint_step=12)
  fresh = str(tmp_path / 'fresh')

  def refused(match, workdir=fresh, error=configuration.ConfigError, **fields):
    with pytest.raises(error, match=match) as raised:
      train.train_and_evaluate(tiny_config(text, **{'init_from': source, **fields}), workdir)
    assert '\n' not in str(raised.value)

  refused(r"^config.init_from: '.*nowhere' is not the workdir of a run \(no config.json\)",
          init_from=str(tmp_path / 'nowhere'))
  untrained = _fake_run(tmp_path / 'untrained', source_config, vocabulary)
  refused(r"^config.init_from: the run in '.*untrained' has no checkpoint yet. Train it",
          init_from=untrained)
  refused(r"^config.init_from: '.*source' is this run's own --workdir", workdir=source)
  refused(r"^config.init_from: the run in '.*source' has another network \(n_embd: 16 there, "
          r"32 here; bias: False there, True here\). Set the same fields to start from its "
          r'weights, e.g. --config.n_embd=16 --config.bias=False$', n_embd=32, bias=True)
  refused(r"^config.vocabulary: this run makes a byte vocabulary, but the run in '.*source' "
          r'was trained with a char vocabulary of \d+ symbols \(vocabulary.json there\)',
          vocabulary='byte')
  # A workdir holding another run's checkpoint: starting there would mix two runs.
  other = _fake_run(tmp_path / 'other', tiny_config(text), checkpoint_step=3)
  refused(r"^config.init_from: --workdir '.*other' already holds a checkpoint of another run "
          r"\(trained from its seed\); starting it from '.*source' would mix the two runs. Use "
          r'a new --workdir', workdir=other)
  # A text with a character the source's vocabulary lacks: both vocabularies named.
  odd = tmp_path / 'odd.txt'
  odd.write_text(open(text).read() + '\nZebra!', encoding='utf-8')
  with pytest.raises(data.DataError,
                     match=r"the validation text has the character 'Z' .* not in the char "
                           r'vocabulary of \d+ symbols. The run in .*source was trained with '
                           r'that vocabulary .*; this text gives a char vocabulary of \d+ '
                           r'symbols'):
    train.train_and_evaluate(tiny_config(str(odd), init_from=source), str(tmp_path / 'odd'))
  assert not os.path.exists(os.path.join(source, workdir_lib.SUMMARY_FILE))


def test_a_network_of_another_shape_is_one_line():
  network = {'params': {'blocks_0': {'kernel': np.zeros((3, 4))}}}
  train.check_network_fits(network, jax.eval_shape(lambda: network), 'SRC')
  with pytest.raises(configuration.ConfigError,
                     match=r"^config.init_from: the network of the run in 'SRC' does not fit "
                           r"this model: \['params'\]\['blocks_0'\]\['kernel'\] is \(3, 4\) "
                           r'there and \(3, 10\) here'):
    train.check_network_fits(network, {'params': {'blocks_0': {
        'kernel': jax.ShapeDtypeStruct((3, 10), np.float32)}}}, 'SRC')
