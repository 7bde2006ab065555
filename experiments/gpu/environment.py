"""Part 1, environment: versions (jax, jaxlib, flax, optax, orbax, chex, clu), devices,
platform."""

import importlib.metadata
import os
import platform
import sys

import jax

from experiments.gpu import record as record_lib


def environment(record: dict, budget: record_lib.Budget, report: record_lib.Report) -> None:
  del budget, report
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'chex', 'clu', 'numpy',
               'absl-py', 'pytest', 'ml_collections', 'tensorflow'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  record.update(
      versions=versions, python=sys.version.split()[0], platform=platform.platform(),
      cpu_count=os.cpu_count(), backend=jax.default_backend(), device_count=jax.device_count(),
      devices=[f'{d.platform}:{d.device_kind}' for d in jax.devices()],
      device_memory_gib=round(stats.get('bytes_limit', 0) / 2**30, 1),
      jax_environment=jax.print_environment_info(return_string=True))


def markdown(part: dict) -> list[str]:
  versions = part.get('versions', {})
  return [f"{part.get('device_count')} x {', '.join(sorted(set(part.get('devices', []))))} "
          f"({part.get('device_memory_gib')} GiB), backend {part.get('backend')}, Python "
          f"{part.get('python')}, {part.get('cpu_count')} CPUs.", '',
          ', '.join(f'{k} {v}' for k, v in versions.items()), '']

