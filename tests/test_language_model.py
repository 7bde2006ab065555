"""The language-model task through the trainer: a CLI run, resume, the stored vocabulary, the
split and composition check with token inputs. A tiny GPT on a small generated text."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import shakespeare_char_cpu
from fdg_jax import data
from fdg_jax.data import image_sources
from fdg_jax.data import text_data
from fdg_jax.models import partition
from fdg_jax.tasks import language_model
from fdg_jax.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('the quick brown fox jumps over a lazy dog while kings and queens speak of love and '
         'war').split()
# The tiny GPT of these tests (fields of configs/shakespeare_char_cpu.py).
TINY = {'n_layer': 2, 'n_head': 2, 'n_embd': 16, 'block_size': 16, 'batch_size': 4,
        'eval_batch_size': 32, 'eval_max_batches': 2, 'sample_tokens': 12,
        'log_every_steps': 4, 'checkpoint_every_steps': 0, 'warmup_steps': 2,
        'dataset': 'textfile'}


def write_text(path, lines=300, seed=0):
  rng = np.random.default_rng(seed)
  text = '\n'.join(' '.join(rng.choice(WORDS, 8)).capitalize() + '.' for _ in range(lines))
  path.write_text(text, encoding='utf-8')
  return str(path)


def tiny_config(text_path, steps=12, **fields):
  config = shakespeare_char_cpu.get_config()
  config.update({**TINY, 'data_dir': text_path, 'num_train_steps': steps,
                 'lr_decay_steps': steps, 'eval_every_steps': steps // 2, **fields})
  return config


@pytest.mark.slow
def test_cli_trains_fdg_and_reports_bits_per_character_and_a_sample(tmp_path):
  text = write_text(tmp_path / 'text.txt')
  workdir = tmp_path / 'run'
  overrides = [f'--config.{k}={v}' for k, v in {**TINY, 'data_dir': text, 'num_train_steps': 12,
                                                'lr_decay_steps': 12, 'eval_every_steps': 6}.items()]
  result = subprocess.run(
      [sys.executable, '-m', 'fdg_jax.main', '--config=configs/shakespeare_char_cpu.py',
       f'--workdir={workdir}', *overrides], cwd=REPO, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['task'] == 'language_model' and summary['method'] == 'fdg'
  assert summary['num_stages'] == 2 and summary['dataset'] == 'textfile:text.txt'
  assert summary['val_bits_per_char'] == pytest.approx(summary['val_loss'] / np.log(2))
  assert summary['val_perplexity'] == pytest.approx(np.exp(summary['val_loss']))
  assert summary['val_loss'] < np.log(summary['vocabulary_size'])   # it learned something
  assert len(summary['sample']) >= TINY['sample_tokens']
  assert [h['step'] for h in summary['history']] == [6, 12]
  assert (workdir / 'samples.txt').read_text().count('--- step') == 2
  stored = text_data.load_vocabulary(str(workdir))
  assert stored.kind == 'char' and stored.size == summary['vocabulary_size']
  console = result.stdout + result.stderr
  assert 'bits per token' in console and 'sample:' in console


@pytest.mark.slow
def test_a_resumed_run_equals_a_straight_one(tmp_path):
  text = write_text(tmp_path / 'text.txt')
  straight = train.train_and_evaluate(tiny_config(text, steps=12, method='bp'),
                                      str(tmp_path / 'straight'))
  first = tiny_config(text, steps=6, method='bp')
  first.lr_decay_steps = 12   # the same schedule as the straight run
  train.train_and_evaluate(first, str(tmp_path / 'resumed'))
  resumed = train.train_and_evaluate(tiny_config(text, steps=12, method='bp'),
                                     str(tmp_path / 'resumed'))
  assert resumed['resumed_from_step'] == 6
  assert resumed['params_digest'] == straight['params_digest']
  assert resumed['val_loss'] == straight['val_loss']


def test_a_changed_vocabulary_is_refused_before_training(tmp_path):
  text = tmp_path / 'text.txt'
  write_text(text)
  workdir = tmp_path / 'run'
  config = tiny_config(str(text))
  language_model.LanguageModel(config).load_data(str(workdir))   # stores the vocabulary, as a run does
  text.write_text(text.read_text() + '\nZebras & yaks!', encoding='utf-8')
  with pytest.raises(data.DataError, match='vocabulary'):
    language_model.LanguageModel(config).load_data(str(workdir))


def test_the_split_balances_blocks_and_the_stages_compose_on_tokens(tmp_path):
  config = tiny_config(write_text(tmp_path / 'text.txt'), n_layer=4, num_stages=3,
                       stage_devices=(0,))
  task = language_model.LanguageModel(config)
  data = task.load_data()
  stages, variables, split, _ = train.build_stages(
      config, task, task.num_outputs(data), jax.random.key(0),
      check_inputs=task.check_inputs(data))
  # [embedding, block x 4, head]: the blocks cost the same, the ends little.
  assert split == (2, 4) and len(stages) == 3
  # Each stage holds exactly its blocks' parameters: the GPT's, counted by hand (no biases).
  width, vocab, context = config.n_embd, task.num_outputs(data), config.block_size
  block = 12 * width * width + 2 * width   # attention 4 C^2, MLP 8 C^2, two LayerNorm scales
  assert [partition.count_params(v['params']) for v in variables] == [
      (vocab + context) * width + block, 2 * block, block + width + width * vocab]
