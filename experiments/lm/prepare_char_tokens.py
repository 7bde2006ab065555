r"""Writes nanoGPT's shakespeare_char token files from a text: train.bin, val.bin and meta.pkl.

The logic of karpathy/nanoGPT's data/shakespeare_char/prepare.py, without its download: the
vocabulary is the text's sorted distinct characters, the first 90% of the characters train and
the rest validate, each split written as uint16 ids (`tofile`), and meta.pkl is the pickle of
{'vocab_size', 'itos', 'stoi'}. The text is read as nanoGPT reads it (`open(path, 'r')`, so
'\r\n' becomes '\n'; UTF-8 here). The language model trains on the folder with
`--config.dataset=tokens` and reaches what the text file gives it (same ids, same batches):

    python -m experiments.lm.prepare_char_tokens --input=PATH/TO/tinyshakespeare.txt \
        --out=/tmp/shakespeare_char
    python -m fdg_jax.main --config=configs/shakespeare_char_cpu.py --workdir=/tmp/tokens \
        --config.dataset=tokens --config.data_dir=/tmp/shakespeare_char
"""

import os
import pickle

from absl import app
from absl import flags
import numpy as np

flags.DEFINE_string('input', None, 'A UTF-8 text file.')
flags.DEFINE_string('out', None, 'The folder to write train.bin, val.bin and meta.pkl into.')
FLAGS = flags.FLAGS


def prepare(text: str, out: str) -> dict:
  """Writes `text`'s token files into the folder `out` as nanoGPT's prepare.py; returns meta."""
  chars = sorted(set(text))
  stoi = {char: index for index, char in enumerate(chars)}
  itos = {index: char for index, char in enumerate(chars)}
  cut = int(len(text) * 0.9)
  os.makedirs(out, exist_ok=True)
  for name, part in (('train.bin', text[:cut]), ('val.bin', text[cut:])):
    np.array([stoi[char] for char in part], dtype=np.uint16).tofile(os.path.join(out, name))
  meta = {'vocab_size': len(chars), 'itos': itos, 'stoi': stoi}
  with open(os.path.join(out, 'meta.pkl'), 'wb') as f:
    pickle.dump(meta, f)
  return meta


def main(argv):
  del argv
  with open(FLAGS.input, 'r', encoding='utf-8') as f:
    text = f.read()
  meta = prepare(text, FLAGS.out)
  print(f'{len(text):,} characters, vocab size {meta["vocab_size"]}: wrote train.bin, val.bin '
        f'and meta.pkl to {FLAGS.out}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['input', 'out'])
  app.run(main)
