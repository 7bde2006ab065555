"""Paper Table 2 row: resnet20 on CIFAR-10, FDG with K = 2 (the paper's recipe from default.py)."""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'resnet20'
  config.num_stages = 2
  # Gradient shrinking: the beta the paper reports as best for this row (Table 2, CIFAR-10).
  config.beta = 0.2
  # Epochs of warm-up at lr 0.01 (the paper warms up ResNet-110 and K = 3, 4).
  config.warmup_epochs = 0
  return config
