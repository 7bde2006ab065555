"""The data: sources read into host arrays, and their deterministic, resumable batch streams.

`image_sources` (CIFAR through tfds, the official python pickles, image folders and archives,
with a decoded cache), `image_batches` (normalisation, augmentation, the seeded training stream
and the test batches) and `text_data` (texts, their character or byte vocabularies, random
training windows and fixed evaluation windows).

Import rule (checked by tests/test_layout.py): data imports nothing of fdg_jax outside
`fdg_jax.data`. Batches are numpy arrays on the host; the trainer puts them on devices.
"""


class DataError(ValueError):
  """Bad or missing data; the message names the problem and the fix."""
