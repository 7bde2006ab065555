"""The paper's reported numbers, typed in once, for the reports and the results notebook.

Source: the results section of the authors' code repository, github.com/ZHUANGHP/FDG (README.md
at commit a700feb), which gives the tables of arXiv:1906.09108 (Zhuang, Wang, Liu, Lin 2019):
"K=2, CIFAR-10" (Table 2 here), "K=2, CIFAR-100" (Table 3) and "For multiple GPUs (CIFAR-10 with
ResNet-56)" (Table 4). Their setting: SGD, lr 0.1 divided by 10 at epochs 150, 225 and 275 of
300, momentum 0.9, weight decay 5e-4, batch 128, one or more Tesla K80 GPUs; FDG's test errors are
the median of 3 runs. Fig. 4a's bars are not given there as numbers; its end points (BP, beta = 1
and the best beta for ResNet-20, K = 2) are Table 2's ResNet-20 row.

BP has two values in the source: one cited from the literature and one rerun by the authors with
their recipe (marked *). Comparisons use the rerun, which is the paper's own baseline.
"""

from typing import Optional

SOURCE = ('Zhuang et al. (2019), arXiv:1906.09108, as tabulated in the authors\' repository '
          'README (github.com/ZHUANGHP/FDG, commit a700feb)')
SETTING = ('full training split, 300 epochs, batch 128, lr 0.1 /10 at 150, 225, 275, Tesla K80 '
           'GPUs; FDG: median of 3 runs')

# Test errors in %. Per table and model: 'bp' (the authors' rerun), 'bp_cited' (from the
# literature), 'ddg', 'dgl' and 'fdg' as {beta: error} (beta = 1 and the tuned beta); a method
# the paper does not report for that row is absent.
TEST_ERRORS = {
    'Table 2': {   # CIFAR-10, K = 2
        'resnet20': {'bp': 7.78, 'bp_cited': 8.75, 'fdg': {1.0: 7.92, 0.2: 7.23}},
        'resnet56': {'bp': 6.19, 'bp_cited': 6.97, 'ddg': 6.89, 'fdg': {1.0: 6.20, 0.5: 5.90}},
        'resnet110': {'bp': 5.79, 'bp_cited': 6.41, 'ddg': 6.59, 'dgl': 6.50,
                      'fdg': {1.0: 5.79, 0.5: 5.73}},
        'resnet18': {'bp': 4.87, 'bp_cited': 6.48, 'fdg': {1.0: 4.82, 0.8: 4.79}},
        'wrn28_10': {'bp_cited': 4.00, 'fdg': {1.0: 4.13, 0.7: 3.85}},
    },
    'Table 3': {   # CIFAR-100, K = 2
        'resnet56': {'bp': 27.68, 'bp_cited': 30.21, 'ddg': 29.83, 'fdg': {1.0: 27.87, 0.8: 27.70}},
        'resnet110': {'bp': 25.82, 'bp_cited': 28.10, 'ddg': 28.61,
                      'fdg': {1.0: 25.73, 0.5: 25.43}},
        'resnet18': {'bp': 22.35, 'fdg': {1.0: 22.78, 0.5: 22.18}},
        'wrn28_10': {'bp_cited': 19.2, 'fdg': {1.0: 20.28, 0.6: 19.08}},
    },
}
# Table 4 (ResNet-56 on CIFAR-10): FDG per K as {beta: error}, BP's error (the rerun), and the
# training time per K as a share of BP's (1 = BP on one GPU).
TABLE4_BP_ERROR = 6.19
TABLE4_FDG_ERRORS = {2: {1.0: 6.20, 0.5: 5.90}, 3: {1.0: 6.40, 0.2: 6.08},
                     4: {1.0: 6.83, 0.3: 6.14}}
TABLE4_TIME_SHARE = {1: 1.0, 2: 0.6064, 3: 0.5203, 4: 0.4432}


def fdg_errors(table: str, model: str, num_stages: int) -> dict:
  """{beta: test error} of FDG for a table's row (Table 4: ResNet-56 at `num_stages`)."""
  if table == 'Table 4':
    return dict(TABLE4_FDG_ERRORS.get(num_stages, {})) if model == 'resnet56' else {}
  return dict(TEST_ERRORS.get(table, {}).get(model, {}).get('fdg', {})) if num_stages == 2 else {}


def tuned_beta(table: str, model: str, num_stages: int = 2) -> Optional[float]:
  """The beta below 1 the paper reports for a row (None if it reports none)."""
  betas = [b for b in fdg_errors(table, model, num_stages) if b != 1.0]
  return betas[0] if betas else None


def test_error(table: str, model: str, method: str, num_stages: int = 2,
               beta: float = 1.0) -> Optional[float]:
  """The paper's test error (%) of exactly this cell, or None if it reports none."""
  if method == 'fdg':
    return fdg_errors(table, model, num_stages).get(beta)
  if table == 'Table 4':
    return TABLE4_BP_ERROR if (method, model) == ('bp', 'resnet56') else None
  if method != 'bp' and num_stages != 2:
    return None
  return TEST_ERRORS.get(table, {}).get(model, {}).get(method)


def describe(table: str, model: str, method: str, num_stages: int = 2,
             beta: float = 1.0) -> str:
  """The paper column of a report: the cell's value, or for FDG at a beta the paper did not
  report, the values it did report for that row; '–' if the paper has nothing there."""
  value = test_error(table, model, method, num_stages, beta)
  if value is not None:
    return f'{value:.2f}'
  if method == 'bp':
    cited = TEST_ERRORS.get(table, {}).get(model, {}).get('bp_cited')
    return f'{cited:.2f} (cited, no rerun)' if cited is not None else '–'
  reported = fdg_errors(table, model, num_stages) if method == 'fdg' else {}
  return ', '.join(f'β={b:g}: {e:.2f}' for b, e in sorted(reported.items())) or '–'
