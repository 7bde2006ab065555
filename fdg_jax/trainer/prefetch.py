"""Batches onto the stages' devices ahead of time, from a background thread.

`prefetch_to_device(iterator, size, sharding)` keeps `size` batches transferred while the step
runs, so host-side batching overlaps the pipeline's compute; any task's batches (pytrees of host
arrays) go through it.
"""

import queue
import threading

from fdg_jax.engine import distributed


class _ProducerError:
  """Carries an exception from the producer thread to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def _place(batch, sharding):
  """`jax.device_put(batch, sharding)` (`distributed.put`: `sharding` may span processes);
  with a tuple of shardings, a None entry leaves that element of the batch where it is (on the
  host, or a shape for another process's stage)."""
  if isinstance(sharding, tuple):
    return tuple(x if s is None else distributed.put(x, s) for x, s in zip(batch, sharding))
  return distributed.put(batch, sharding)


def prefetch_to_device(iterator, size: int, sharding):
  """Yields `_place(batch, sharding)` (device_put) with `size` batches queued.

  A daemon thread reads `iterator` and transfers batches (pytrees of arrays)
  so host-side work overlaps the training step. Exceptions from `iterator`
  are re-raised in the consumer; closing (or dropping) this generator stops
  the thread and closes `iterator`.
  """
  if size <= 0:  # No prefetching: transfer on demand.
    for batch in iterator:
      yield _place(batch, sharding)
    return

  ready: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    # Bounded waits so a stopped consumer never leaves the thread blocked.
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for batch in iterator:
        if not put(_place(batch, sharding)):
          return
      put(_END)
    except BaseException as e:  # pylint: disable=broad-except
      put(_ProducerError(e))
    finally:
      close = getattr(iterator, 'close', None)
      if close is not None:
        close()

  thread = threading.Thread(target=produce, name='prefetch_to_device',
                            daemon=True)
  thread.start()
  try:
    while True:
      item = ready.get()
      if item is _END:
        return
      if isinstance(item, _ProducerError):
        raise item.error
      yield item
  finally:
    stop.set()
    # Free queued device buffers now rather than when the thread exits.
    while True:
      try:
        ready.get_nowait()
      except queue.Empty:
        break
    thread.join(timeout=1.0)
