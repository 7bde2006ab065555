"""A few minutes on a laptop CPU: ResNet-20, K = 2 on one device, a small subset.

Every method and K run on one device as they are, e.g. `--config.method=bp` or
`--config.num_stages=3`; FDG's stages then share that device (a simulation: right numbers,
no parallel speed).

    python -m fdg_jax.main --config=configs/cpu_quick.py --workdir=/tmp/fdg_quick \
        --config.dataset=imagefolder --config.data_dir=PATH/TO/cifar10-jpeg.tar.gz
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'resnet20'
  config.num_stages = 2
  # Every stage on device 0, whatever K, so it runs without simulated devices.
  config.stage_devices = (0,)
  # Gradient shrinking factor (see configs/default.py).
  config.beta = 0.5
  config.batch_size = 64
  # 2,560 training images = 40 steps per epoch; 2 epochs.
  config.train_subset = 2560
  config.test_subset = 1000
  config.num_epochs = 2
  config.lr_boundaries_epochs = (1,)
  config.eval_every_epochs = 1
  config.log_every_steps = 10
  config.eval_batch_size = 250
  return config
