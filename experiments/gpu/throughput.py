"""Part 3, throughput: steps per second, BP against FDG with every stage on device 0 (the
engine's overhead; the ideal ratio is 1.0), compilation and pipeline fill excluded, timed windows
interleaved; by priority (the plan in `throughput`): ResNet-56 at batch 128, nanoGPT's GPU
character GPT in bfloat16, configs/shakespeare_char_cpu.py's GPT, then ResNet-56 at K = 4 and
the GPU GPT in float32."""

from absl import flags

from experiments.gpu import record as record_lib
from experiments.gpu import workloads
from experiments.gpu.workloads import VOCAB_SIZE, gpt_model, on_one_device, resnet

FLAGS = flags.FLAGS   # --smoke: workloads.py's
markdown = workloads.rows_markdown


def throughput(record: dict, budget: record_lib.Budget, report: record_lib.Report) -> None:
  s = workloads.sizes()

  def one(k):
    return on_one_device(k)
  bp_fdg = [('bp', 1, one(1)), ('fdg', 2, one(2))]
  def image_model():
    return resnet(s.resnet, s.image_batch, s.image_size)
  # By priority: what the issue asks first, then K = 4 and float32 if time is left.
  plan = [
      (image_model, bp_fdg, 0),
      (lambda: gpt_model('gpt_gpu', s.gpt_gpu, VOCAB_SIZE, 'bfloat16'), bp_fdg, 30),
      (lambda: gpt_model('gpt_cpu', s.gpt_cpu, VOCAB_SIZE, 'float32'), bp_fdg, 20),
      (image_model, [('bp', 1, one(1)), ('fdg', 4, one(4))], 60),
      (lambda: gpt_model('gpt_gpu', s.gpt_gpu, VOCAB_SIZE, 'float32'), bp_fdg, 30),
  ]
  record['note'] = ('every stage on device 0: ratio_to_first = FDG steps/s over BP steps/s, '
                    'the pipeline overhead (1.0 is none)')
  # --smoke: the GPT only (two_gpus runs the ResNet).
  workloads.run_models(record, budget, report, plan[2:3] if FLAGS.smoke else plan)
