"""ResNet-20 on CIFAR-100 (not a row of the paper's Table 3: for reduced-scale runs).

Keeps the CIFAR-10 ResNet-20 row's beta; the paper reports none for CIFAR-100.
"""

from configs import cifar10_resnet20


def get_config():
  config = cifar10_resnet20.get_config()
  config.dataset = 'cifar100'
  return config
