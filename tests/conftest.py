"""Test set-up: eight simulated CPU devices, XLA's quick compilation, and a persistent
compilation cache, set before JAX starts."""

import getpass
import os
import tempfile

# The tests' programs are small and most run a few times, so compiling them is most of the
# suite's time. LLVM without optimisation compiles them about five times faster (a ResNet-8
# init: 15 s -> 3 s on a 2-core machine); what they compute is checked against naive references
# either way. Training runs outside the tests compile as usual.
# (pytest-xdist's workers inherit the flags from the controller: each is added once.)
QUICK_COMPILE_FLAGS = '--xla_backend_optimization_level=2'
_flags = os.environ.get('XLA_FLAGS', '').split()
if not any(flag.startswith('--xla_backend_optimization_level') for flag in _flags):
  _flags.append(QUICK_COMPILE_FLAGS)
if not any(flag.startswith('--xla_force_host_platform_device_count') for flag in _flags):
  _flags.append('--xla_force_host_platform_device_count=8')
os.environ['XLA_FLAGS'] = ' '.join(_flags)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # TensorFlow (tfds, clu writers) stays off GPUs
# Many tests start the trainer in fresh processes that compile the same stage programs; JAX's
# persistent cache (keyed by the program, the devices and the jax version, so never stale) lets
# every process after the first load them. It halved the resume tests' time on a 2-core machine.
# The processes inherit it, and it is shared by the xdist workers and kept between runs.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), f'fdg_jax_tests_compilation_cache_{getpass.getuser()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')  # small programs add up

import jax  # noqa: E402  (after the flags above)

assert len(jax.devices()) >= 8, 'XLA_FLAGS was read before conftest set it'
