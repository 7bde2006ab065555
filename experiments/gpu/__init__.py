"""The parts of the prepared GPU session, one module each, for its driver
`python -m experiments.gpu_session` (which documents the session and how to run it):

  environment.py    versions, devices, platform;
  engine_checks.py  the engine's exactness checks (the part named 'engine');
  throughput.py     BP against FDG with every stage on device 0;
  shakespeare.py    nanoGPT's shakespeare_char recipe, BP then FDG K = 2;
  two_gpus.py       FDG K = 2 on two devices against BP on one;

and what they share: record.py (results.json and summary.md, budgets and hard limits) and
workloads.py (the sizes, models and pipelines, and timing them). Each part is a function
`(record, budget, report)` and a `markdown(part)` of its section in summary.md.
"""
