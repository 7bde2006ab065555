"""A run's working directory: its files, resume checks, preemption and divergence.

Everything the trainer writes lives under one workdir: `config.json` (the config it ran with),
`summary.json` (written once, at the end), `checkpoints/` (fdg_jax.checkpoint), TensorBoard
events and `train.log`. Other code (the experiment grids, notebooks) takes the file names from
here.
"""

SUMMARY_FILE = 'summary.json'
CONFIG_FILE = 'config.json'
LOG_FILE = 'train.log'
