"""experiments/probes/precise_bn.py: BatchNorm statistics re-estimated with the final parameters."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments.probes import precise_bn
from fdg_jax import models
from fdg_jax.trainer import train
from test_train import small_config, write_image_folder


class DenseBatchNorm(nn.Module):
  """The smallest network with a BatchNorm layer, built as the models build theirs."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(3, name='dense')(x)
    return models.batch_norm(train, x.dtype, 'norm')(x)


def test_precise_statistics_are_the_mean_of_each_batch_s_mean_and_variance():
  model = DenseBatchNorm()
  rng = np.random.default_rng(0)
  batches = [(rng.normal(size=(16, 5)).astype(np.float32) * (i + 1), None) for i in range(3)]
  variables = model.init(jax.random.key(0), batches[0][0], train=False)
  # Running statistics far from any batch's: the result must not depend on them.
  variables = {'params': variables['params'],
               'batch_stats': {'norm': {'mean': np.full(3, 7.0, np.float32),
                                        'var': np.full(3, 9.0, np.float32)}}}
  kernel = np.asarray(variables['params']['dense']['kernel'], np.float64)
  bias = np.asarray(variables['params']['dense']['bias'], np.float64)
  outputs = [images.astype(np.float64) @ kernel + bias for images, _ in batches]
  for (images, _), y in zip(batches, outputs):
    stats = precise_bn.batch_statistics(model, variables, images)
    np.testing.assert_allclose(stats['norm']['mean'], y.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats['norm']['var'], y.var(0), rtol=1e-5, atol=1e-6)
  precise = precise_bn.precise_statistics(model, variables, batches)
  np.testing.assert_allclose(precise['norm']['mean'], np.mean([y.mean(0) for y in outputs], 0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(precise['norm']['var'], np.mean([y.var(0) for y in outputs], 0),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_finished_run_is_restored_drained_and_reevaluated(tmp_path):
  """FDG K = 2: the restored, drained variables are the summary's (digest), and evaluating the
  unsplit network with them gives the summary's test error."""
  data = write_image_folder(tmp_path / 'data')
  workdir = str(tmp_path / 'run')
  config = small_config(dataset='imagefolder', data_dir=str(data),
                        cache_dir=str(tmp_path / 'cache'), checkpoint_every_steps=4)
  summary = train.train_and_evaluate(config, workdir)
  record = precise_bn.reevaluate(workdir)
  assert record['method'] == 'fdg' and record['num_stages'] == 2 and record['steps'] == 6
  assert record['own_statistics']['test_error'] == pytest.approx(summary['test_error'], abs=1e-6)
  assert record['own_statistics']['test_loss'] == pytest.approx(summary['test_loss'], rel=1e-4)
  assert 0 <= record['precise_statistics']['test_error'] <= 1
  assert record['precise_statistics']['test_loss'] != record['own_statistics']['test_loss']


def test_a_run_without_its_checkpoint_is_refused_with_the_fix(tmp_path):
  with pytest.raises(precise_bn.RunError, match='summary.json'):
    precise_bn.check_readable(str(tmp_path))
  (tmp_path / 'summary.json').write_text('{"num_processes": 1}')
  with pytest.raises(precise_bn.RunError, match='--keep_checkpoints'):
    precise_bn.check_readable(str(tmp_path))
