"""Part 5, two_gpus (only with two or more devices): FDG K = 2 on devices 0 and 1 against BP on
device 0, ResNet-56 then the GPU GPT."""

from absl import flags
import jax

from experiments.gpu import record as record_lib
from experiments.gpu import workloads
from experiments.gpu.workloads import VOCAB_SIZE, gpt_model, resnet

FLAGS = flags.FLAGS   # --smoke: workloads.py's
markdown = workloads.rows_markdown


def two_gpus(record: dict, budget: record_lib.Budget, report: record_lib.Report) -> None:
  s = workloads.sizes()
  devices = jax.devices()
  configurations = [('bp', 1, devices[:1]), ('fdg', 2, devices[:2])]
  record['note'] = 'ratio_to_first = speed-up of FDG K=2 on devices 0 and 1 over BP on device 0'
  plan = [(lambda: resnet(s.resnet, s.image_batch, s.image_size), configurations, 0),
          (lambda: gpt_model('gpt_gpu', s.gpt_gpu, VOCAB_SIZE, 'bfloat16'), configurations, 30)]
  workloads.run_models(record, budget, report, plan[:1] if FLAGS.smoke else plan)
