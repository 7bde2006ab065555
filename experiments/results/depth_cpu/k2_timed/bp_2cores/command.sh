# bp_2cores: from a clean clone of 715d7c4, every other process stopped
python -m fdg_jax.main --config=configs/shakespeare_char_deep_cpu.py --config.dataset=textfile --config.data_dir=../shared/data/tinyshakespeare.txt --config.seed=0 --workdir=experiments/results/depth_cpu/k2_timed/bp_2cores --config.method=bp --config.num_stages=1
