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
from fdg_jax.trainer import configuration
from fdg_jax.trainer import train
from fdg_jax.trainer import workdir as workdir_lib

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
  # Each evaluation records the run's seconds so far without the evaluations (time to loss).
  first, second = summary['history']
  assert 0 < first['train_s'] < second['train_s'] < summary['train_time_s']
  assert (workdir / 'samples.txt').read_text().count('--- step') == 2
  stored = text_data.load_vocabulary(str(workdir))
  assert stored.kind == 'char' and stored.size == summary['vocabulary_size']
  console = result.stdout + result.stderr
  assert 'bits per character' in console and 'sample:' in console
  assert summary['mfu'] is None and 'no MFU: no peak FLOP/s is known for 1 x cpu' in console


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


def test_the_vocabulary_from_the_whole_text_and_old_runs_resume_with_the_training_text(tmp_path):
  """The default vocabulary takes a validation character the training text lacks; a workdir
  written before `vocabulary_from` existed resumes as 'train', what it computed."""
  text = tmp_path / 'text.txt'
  write_text(text)
  text.write_text(text.read_text() + '\nZebras & yaks!', encoding='utf-8')   # in validation only
  config = tiny_config(str(text))
  assert config.vocabulary_from == 'all'
  loaded = language_model.LanguageModel(config).load_data(str(tmp_path / 'run'))
  assert 'Z' in loaded.vocabulary.symbols and '&' in loaded.vocabulary.symbols
  assert text_data.load_vocabulary(str(tmp_path / 'run')) == loaded.vocabulary
  config.vocabulary_from = 'train'
  with pytest.raises(data.DataError, match="the character 'Z'.*vocabulary_from='all'"):
    language_model.LanguageModel(config).load_data()
  config.vocabulary_from = 'every'
  assert language_model.LanguageModel(config).validate() == [
      "config.vocabulary_from: unknown source 'every'. Choose one of ('all', 'train')."]
  # A run's saved config from before the field: it built its vocabulary from the training text.
  old = tmp_path / 'old'
  old.mkdir()
  saved = workdir_lib.jsonable(tiny_config(str(text)))
  del saved['vocabulary_from']
  (old / workdir_lib.CONFIG_FILE).write_text(json.dumps(saved))
  task = language_model.LanguageModel(tiny_config(str(text), vocabulary_from='train'))
  workdir_lib.check_config_matches(task.config, str(old), task)
  task = language_model.LanguageModel(tiny_config(str(text)))
  with pytest.raises(configuration.ConfigError, match="vocabulary_from: 'train' there, 'all' here"):
    workdir_lib.check_config_matches(task.config, str(old), task)


def test_mfu_in_the_summary_from_the_devices_peak(tmp_path):
  """Model FLOPs per token x tokens per second over the devices' dense bf16 peak; none on CPU,
  and the last line says so."""
  assert language_model.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert language_model.peak_flops('NVIDIA H100 PCIe') == 756e12
  assert language_model.peak_flops('NVIDIA H200') == 989e12
  assert language_model.peak_flops('NVIDIA A100-SXM4-40GB') == 312e12
  assert language_model.peak_flops('cpu') is None
  task = language_model.LanguageModel(tiny_config(write_text(tmp_path / 'text.txt')))
  loaded = task.load_data()
  result = {'loss': 2.0, 'accuracy': 0.4}
  flops = task.model_flops_per_token(loaded.vocabulary.size)
  assert flops == 6 * (2 * (12 * 16 * 16 + 2 * 16) + 16 + 16 * loaded.vocabulary.size) + (
      12 * 2 * 2 * 8 * 16)   # 6 N + 12 L H Q T (tests/test_transformers.py counts N by hand)
  summary = task.summary_fields(loaded, result, 1000.0)
  assert summary['model_flops_per_token'] == flops and summary['mfu'] is None
  assert summary['mfu_devices'] == '1 x cpu'
  assert task.final_line(summary) == ('Validation loss 2.0000 nats per token (no MFU: no peak '
                                      'FLOP/s is known for 1 x cpu)')
  task._device_kinds = ['NVIDIA H100 80GB HBM3'] * 2   # pylint: disable=protected-access
  summary = task.summary_fields(loaded, result, 1000.0)
  assert summary['mfu'] == pytest.approx(flops * 1000.0 / (2 * 989e12))
  assert summary['peak_flops'] == 2 * 989e12
  assert task.final_line(summary).endswith(
      f"(MFU {summary['mfu']:.2%} of the dense bf16 peak of 2 x NVIDIA H100 80GB HBM3)")
