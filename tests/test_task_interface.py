"""The task interface (fdg_jax/tasks/base.py): a third task is one module and one config.

The toy task below (least-squares regression on generated data, with a loss and metrics of its
own) is written to a temporary folder as a module outside the package, with a config beside it;
nothing else is touched, and the trainer's CLI trains it with FDG at K = 2.
"""

import json
import os
import subprocess
import sys

import pytest

from fdg_jax import tasks
from fdg_jax.tasks import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOY_TASK = '''
"""A toy task: y = x @ w on generated data, a two-block MLP, mean squared error."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
import flax

from fdg_jax.tasks import base


class Hidden(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x, train):
    del train
    return nn.tanh(nn.Dense(self.width)(x))


class Out(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train):
    del train
    return nn.Dense(self.features)(x)


def squared_error(outputs, targets):
  return jnp.sum((outputs - targets) ** 2, axis=-1)


@flax.struct.dataclass
class Metrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output('loss')


class ToyRegression(base.Task):
  DATASETS = ('generated',)
  ITEMS = 'examples'
  EVAL_SPLIT = 'val'
  loss_fn = staticmethod(squared_error)
  metrics = Metrics

  @staticmethod
  def config_fields():
    fields = ml_collections.ConfigDict()
    # Examples generated for training (as many again for validation).
    fields.num_examples = 256
    # Features of each example.
    fields.num_features = 4
    return fields

  @staticmethod
  def model_names():
    return ('mlp',)

  def validate(self):
    if self.config.num_features < 1:
      return [base.problem('num_features', f'{self.config.num_features} is not positive',
                           'Use 1 or more.')]
    return []

  def num_blocks(self):
    return 2

  def create_blocks(self, num_outputs):
    return [Hidden(16), Out(num_outputs)], ['hidden', 'out']

  def input_spec(self, batch_size):
    return jax.ShapeDtypeStruct((batch_size, self.config.num_features), np.float32)

  def known_num_outputs(self):
    return 1

  def load_data(self, workdir=None):
    rng = np.random.default_rng(1234)
    n, d = self.config.num_examples, self.config.num_features
    x = rng.normal(size=(2 * n, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d, 1))).astype(np.float32)
    return {'train': (x[:n], y[:n]), 'val': (x[n:], y[n:])}

  def num_outputs(self, data):
    return 1

  def describe(self, data):
    return f"toy regression, {len(data['train'][0])} examples"

  def num_train_examples(self, data):
    return len(data['train'][0])

  def steps_per_epoch(self, data):
    return len(data['train'][0]) // self.config.batch_size

  def check_inputs(self, data):
    return data['val'][0][:4]

  def train_batches(self, data, start_step, with_inputs=True):
    x, y = data['train']
    size, steps = self.config.batch_size, self.steps_per_epoch(data)
    step = start_step
    while True:
      i = step % steps
      yield x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]
      step += 1

  def eval_batches(self, data):
    x, y = data['val']
    size = self.config.eval_batch_size
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x) - size + 1, size)]

  def eval_record(self, result):
    return {'val_mse': result['loss']}

  def eval_line(self, result):
    return f"val mse {result['loss']:.5f}"

  def summary_fields(self, data, result, items_per_sec):
    return {'val_mse': result['loss'], 'examples_per_sec': items_per_sec}

  def final_line(self, summary):
    return f"Validation mse {summary['val_mse']:.5f}"


TASK = ToyRegression
'''

TOY_CONFIG = '''
"""The toy regression task, FDG K = 2, stages on device 0."""

from configs import default
from fdg_jax import tasks


def get_config():
  config = tasks.configure(default.get_config(), 'toy_regression')
  config.model = 'mlp'
  config.dataset = 'generated'
  config.method = 'fdg'
  config.num_stages = 2
  config.stage_devices = (0,)
  config.batch_size = 16
  config.num_train_steps = 48
  config.learning_rate = 0.05
  config.weight_decay = 0.0
  config.lr_boundaries_epochs = ()
  config.eval_every_steps = 16
  config.eval_batch_size = 64
  config.log_every_steps = 8
  config.checkpoint_every_steps = 0
  return config
'''


@pytest.fixture
def toy(tmp_path):
  """The toy task's module and config in a folder of their own."""
  (tmp_path / 'toy_regression.py').write_text(TOY_TASK)
  (tmp_path / 'toy_config.py').write_text(TOY_CONFIG)
  sys.path.insert(0, str(tmp_path))
  yield tmp_path
  sys.path.remove(str(tmp_path))
  sys.modules.pop('toy_regression', None)


def test_a_module_with_a_task_class_is_a_task_by_its_dotted_name(toy):
  task = tasks.get('toy_regression')
  assert issubclass(task, base.Task) and task.model_names() == ('mlp',)
  with pytest.raises(ValueError, match="Unknown task 'no_such_task'"):
    tasks.get('no_such_task')
  (toy / 'not_a_task.py').write_text('TASK = 3\n')
  with pytest.raises(ValueError, match='no TASK class'):
    tasks.get('not_a_task')


def test_configure_swaps_one_tasks_fields_for_anothers(toy):
  del toy
  from configs import default   # pylint: disable=import-outside-toplevel
  config = default.get_config()
  assert 'image_size' in config and 'n_layer' not in config
  config = tasks.configure(config, 'language_model')
  assert 'n_layer' in config and 'image_size' not in config and config.aux_head == 'lm'
  config = tasks.configure(config, 'toy_regression')
  assert config.task == 'toy_regression' and config.num_features == 4
  assert 'n_layer' not in config and 'aux_head' not in config


def test_an_incomplete_task_cannot_be_made():
  class Incomplete(base.Task):
    @staticmethod
    def config_fields():
      return {}
  with pytest.raises(TypeError, match='abstract'):
    Incomplete({})


@pytest.mark.slow
def test_a_third_task_trains_with_fdg_from_the_cli(toy):
  """The toy module and its config, and nothing else: the CLI validates its fields (a bad one
  is refused by the task's own check), trains it with FDG K = 2 and writes its summary."""
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(toy), REPO])}
  def cli(*args):
    return subprocess.run([sys.executable, '-m', 'fdg_jax.main', f'--config={toy}/toy_config.py',
                           *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  bad = cli(f'--workdir={toy / "bad"}', '--config.num_features=0')
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1] == (
      'error: config.num_features: 0 is not positive. Use 1 or more.')
  assert bad.stderr.count('0 is not positive') == 1   # said once, not also as a log line
  run = cli(f'--workdir={toy / "work"}')
  assert run.returncode == 0, run.stderr[-3000:]
  summary = json.loads((toy / 'work' / 'summary.json').read_text())
  assert (summary['task'], summary['method'], summary['num_stages']) == (
      'toy_regression', 'fdg', 2)
  assert summary['stage_split'] == [1] and summary['steps'] == 48
  mse = [entry['val_mse'] for entry in summary['history']]
  assert len(mse) == 3 and mse == sorted(mse, reverse=True) and mse[-1] < mse[0], mse   # it learns
  assert summary['val_mse'] == mse[-1]
  assert 'val mse' in run.stderr and 'Validation mse' in run.stderr
