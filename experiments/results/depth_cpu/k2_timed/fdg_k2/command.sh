# fdg_k2: from a clean clone of 715d7c4, every other process stopped
python -m fdg_jax.launch --num_processes=2 -- --config=configs/shakespeare_char_deep_cpu.py --config.dataset=textfile --config.data_dir=../shared/data/tinyshakespeare.txt --config.seed=0 --workdir=experiments/results/depth_cpu/k2_timed/fdg_k2 --config.method=fdg --config.num_stages=2 '--config.stage_devices=()'
