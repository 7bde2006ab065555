"""Language-model grids: FDG against BP and the other methods on a character GPT
(configs/shakespeare_char*.py), built on experiments/grids/."""
