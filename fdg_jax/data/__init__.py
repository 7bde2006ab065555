"""The data: sources read into host arrays, and their deterministic, resumable batch streams.

`image_sources` (CIFAR through tfds, the official python pickles, image folders and archives,
with a decoded cache), `image_batches` (normalisation, augmentation, the seeded training stream
and the test batches), `text_data` (texts, their character, byte or BPE vocabularies, random
training windows and fixed evaluation windows) and `token_files` (nanoGPT's prepared token
files, memory-mapped, as `text_data.TextData`).

Import rule (checked by tests/test_layout.py): data imports nothing of fdg_jax outside
`fdg_jax.data`. Batches are numpy arrays on the host; the trainer puts them on devices.
"""


class DataError(ValueError):
  """Bad or missing data; the message names the problem and the fix."""
