"""Every config file in configs/ loads, passes the trainer's checks and builds its stages
(`train.dry_run`: the stage table, the split, every stage's initial variables; no data is read
where the config alone gives the model's output size, and a language model reads a small text
made here instead of tiny_shakespeare, which needs the internet)."""

import os
import runpy

import pytest

from fdg_jax.trainer import train

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
NAMES = sorted(name for name in os.listdir(CONFIGS) if name.endswith('.py'))


def test_every_config_file_is_listed():
  assert 'default.py' in NAMES and len(NAMES) >= 17


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_config_file_passes_the_checks_and_builds_its_stages(name, tmp_path, capsys):
  config = runpy.run_path(os.path.join(CONFIGS, name))['get_config']()
  if config.task == 'language_model':
    text = tmp_path / 'text.txt'
    text.write_text('First Citizen:\nBefore we proceed any further, hear me speak.\n' * 100)
    config.dataset, config.data_dir = 'textfile', str(text)
  train.dry_run(config)
  assert f'Stages of {config.model}' in capsys.readouterr().out
