"""The paper's comparisons as grids (table2, table3, table4, fig4a_beta, compensation_grid) and
the paper's own numbers (published)."""
