"""The number a grid compares, and how it is shown: a field of the runs' summary.json (and of
each entry of their `history`), lower is better.

Image classification grids compare `TEST_ERROR` (a fraction, shown in %); language-model grids
`VAL_LOSS` (nats per token). reports.py averages, pairs, tabulates and plots whichever a script
names; grid.py logs it after each run.
"""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Metric:
  field: str          # in summary.json and in each history entry
  label: str          # table column and axis label, unit included
  difference: str     # the unit of a difference, for the 'vs BP' column: 'points', 'nats/token'
  description: str    # what the number is, for results.md
  factor: float = 1.0   # shown as factor * value (100: a fraction shown in %)
  digits: int = 2
  suffix: str = ''      # after a logged value ('%')

  def shown(self, value: float) -> float:
    return self.factor * value

  def format(self, mean: float, std: float = math.nan) -> str:
    """'7.12 ± 0.31' (± the std), '7.12' without one, '–' for no value."""
    if math.isnan(mean):
      return '–'
    text = f'{self.shown(mean):.{self.digits}f}'
    return text if math.isnan(std) else f'{text} ± {self.shown(std):.{self.digits}f}'

  def format_difference(self, mean: float, se: float) -> str:
    """'+1.87 ± 0.52' (± one standard error), '+1.87' without one."""
    text = f'{self.shown(mean):+.{self.digits}f}'
    return text if math.isnan(se) else f'{text} ± {self.shown(se):.{self.digits}f}'

  def log_line(self, summary: dict) -> str:
    """The run's result as the grid logs it: 'test error 7.12%'."""
    name = self.label.split(' (')[0]
    return f'{name} {self.shown(summary[self.field]):.{self.digits}f}{self.suffix}'


TEST_ERROR = Metric(
    'test_error', 'test error (%)', difference='points', factor=100, digits=2, suffix='%',
    description='Test error of the composed network on the test split after the last epoch, in '
    '%, mean ± sample standard deviation over seeds (n = number of seeds).')
VAL_LOSS = Metric(
    'val_loss', 'validation loss (nats/token)', difference='nats/token', digits=4,
    description='Validation loss of the composed network after the last step: cross-entropy in '
    'nats per token over the whole validation text (lower is better), mean ± sample standard '
    'deviation over seeds (n = number of seeds).')
