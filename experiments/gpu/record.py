"""The session's record and its clock: results.json and summary.md under --out, rewritten after
every step, and each part's budget and hard limit."""

import contextlib
import json
import math
import os
import signal
import sys
import time
import traceback
from typing import Callable

START = time.monotonic()   # --deadline_s counts from here


class PartTimeout(BaseException):
  """A part over its hard limit (a BaseException, so that checks catching Exception let it by)."""


class Budget:
  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds

  def left(self) -> float:
    return self.end - time.monotonic()


@contextlib.contextmanager
def hard_limit(seconds: float):
  """Raises PartTimeout in the main thread after `seconds` (once a running compilation returns:
  a signal cannot stop XLA)."""
  def stop(signum, frame):
    del signum, frame
    raise PartTimeout(f'stopped at its hard limit of {seconds:.0f} s')
  previous = signal.signal(signal.SIGALRM, stop)
  signal.alarm(max(1, math.ceil(seconds)))
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)




class Report:
  """results.json and summary.md under --out, rewritten whole (atomically) on every save;
  `part_markdown` maps each part's name to its section's lines."""

  def __init__(self, out: str, session: dict,
               part_markdown: dict[str, Callable[[dict], list[str]]]):
    os.makedirs(out, exist_ok=True)
    self.out = out
    self.data = {'session': session, 'parts': {}}
    self.part_markdown = part_markdown

  def part(self, name: str) -> dict:
    self.data['parts'][name] = record = {'status': 'running'}
    return record

  def save(self) -> None:
    self.data['session']['seconds'] = round(time.monotonic() - START, 1)
    self._write('results.json', json.dumps(self.data, indent=1, default=str) + '\n')
    self._write('summary.md', markdown(self.data, self.part_markdown))

  def _write(self, name: str, text: str) -> None:
    path = os.path.join(self.out, name)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(path + '.tmp', path)


def run_part(report: Report, name: str, function: Callable, seconds: float) -> None:
  """Runs one part within `seconds` (cooperatively, and hard at 1.25x + 30 s); records it."""
  record = report.part(name)
  record['budget_s'] = round(seconds, 1)
  report.save()
  print(f'== {name} (budget {seconds:.0f} s)', flush=True)
  start = time.monotonic()
  try:
    with hard_limit(seconds * 1.25 + 30):
      function(record, Budget(seconds), report)
    record['status'] = 'failed' if record.get('failed') else 'ok'
  except (Exception, PartTimeout) as e:  # pylint: disable=broad-except
    record['status'] = 'timeout' if isinstance(e, PartTimeout) else 'error'
    record['traceback'] = traceback.format_exc()
    print(record['traceback'], file=sys.stderr, flush=True)
  record['seconds'] = round(time.monotonic() - start, 1)
  report.save()
  print(f'== {name}: {record["status"]} in {record["seconds"]} s', flush=True)


# ---------------------------------------------------------------- the summary


def markdown(data: dict, part_markdown: dict[str, Callable[[dict], list[str]]]) -> str:
  session = data['session']
  lines = [f"# GPU session ({'smoke, CPU' if session['smoke'] else 'device'})", '',
           f"`{session['command']}`, {session.get('seconds', 0)} s.", '']
  for name, part in data['parts'].items():
    if 'reason' in part:
      lines += [f"## {name}: {part['status']}", '', part['reason'], '']
      continue
    lines += [f"## {name}: {part['status']} ({part.get('seconds', '...')} s of "
              f"{part.get('budget_s')} s)", '']
    lines += part_markdown[name](part)
    if part.get('traceback'):
      lines += ['```', *part['traceback'].strip().splitlines()[-25:], '```', '']
  return '\n'.join(lines) + '\n'


def table(header: list[str], rows: list[list]) -> list[str]:
  return (['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
          + ['| ' + ' | '.join('' if v is None else str(v) for v in row) + ' |' for row in rows]
          + [''])


