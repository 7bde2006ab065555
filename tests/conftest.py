"""Test set-up: eight simulated CPU devices, XLA's quick compilation, and a persistent
compilation cache, set before JAX starts."""

import getpass
import os
import tempfile

# The tests' programs are small and most run a few times, so compiling them is much of the
# suite's time. XLA's CPU backend optimises at LLVM -O3 by default; at -O2 it compiles a
# ResNet-8 init in 5 s instead of 15 s, and a two-process trainer test run took 51 s instead of
# 95 s, on a 2-core machine (docs/record/suite_time.md, "The suite's time, part 2"). What the
# programs compute is checked against naive references either way; training outside the tests
# compiles as usual.
QUICK_COMPILE_FLAGS = '--xla_backend_optimization_level=2'
# pytest-xdist's workers inherit the controller's flags: add ours once, keep a level set outside.
_flags = [flag for flag in os.environ.get('XLA_FLAGS', '').split()
          if not flag.startswith('--xla_force_host_platform_device_count')]
if not any(flag.startswith('--xla_backend_optimization_level') for flag in _flags):
  _flags.append(QUICK_COMPILE_FLAGS)
OTHER_XLA_FLAGS = ' '.join(_flags)   # what the runs the tests start keep besides a device count
os.environ['XLA_FLAGS'] = f'{OTHER_XLA_FLAGS} --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # TensorFlow (tfds) stays off GPUs
# Many tests start the trainer in fresh processes that compile the same stage programs; JAX's
# persistent cache (keyed by the program, the devices and the jax version, so never stale) lets
# every process after the first load them. It halved the resume tests' time on a 2-core machine.
# The processes inherit it, and it is shared by the xdist workers and kept between runs.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), f'fdg_jax_tests_compilation_cache_{getpass.getuser()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')  # small programs add up

import jax  # noqa: E402  (after the flags above)

assert len(jax.devices()) >= 8, 'XLA_FLAGS was read before conftest set it'
