"""Paper Table 4: ResNet-56 on CIFAR-10 with K = 3, split by residual group as in the paper."""

from configs import cifar10_resnet56


def get_config():
  config = cifar10_resnet56.get_config()
  config.num_stages = 3
  # Blocks: 0 stem, 1-9 group 1, 10-18 group 2, 19-27 group 3, 28 head.
  config.split = (10, 19)
  # The paper warms up for 3 epochs at K = 3 and 4.
  config.warmup_epochs = 3
  # Gradient shrinking: the beta the paper reports as best at this K (Table 4).
  config.beta = 0.2
  return config
