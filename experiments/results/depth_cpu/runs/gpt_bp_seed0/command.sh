# gpt_bp_seed0, from .
cd . && XLA_FLAGS='' python -m fdg_jax.main --config=configs/shakespeare_char_deep_cpu.py --workdir=experiments/results/depth_cpu/runs/gpt_bp_seed0 --config.beta=1.0 --config.data_dir=../shared/data/tinyshakespeare.txt --config.dataset=textfile --config.method=bp --config.model=gpt --config.num_stages=1 --config.seed=0 '--config.stage_devices=()'
