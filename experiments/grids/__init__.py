"""The grid library: cells and their flags (cells), the trainer subprocess (runner), running and
resuming (grid), statistics, tables and plots (reports)."""
