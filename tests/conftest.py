"""Test set-up: eight simulated CPU devices, set before JAX starts."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # TensorFlow (tfds, clu writers) stays off GPUs

import jax  # noqa: E402  (after the flags above)

assert len(jax.devices()) >= 8, 'XLA_FLAGS was read before conftest set it'
