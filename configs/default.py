"""The paper's CIFAR recipe (docs/algorithm.md): FDG on ResNet-56, K = 2.

Every other config imports this one and changes only what differs.
Override any field on the command line, e.g. `--config.beta=0.5`.
"""

import ml_collections

from fdg_jax import tasks


def get_config():
  config = ml_collections.ConfigDict()
  # 'image_classification' (images, a model from the zoo) or 'language_model' (a GPT on a text;
  # configs/shakespeare_char*.py), or the dotted name of any module with a task class
  # (fdg_jax/tasks/base.py): which task builds the model, reads the data and scores the run.
  # Each task adds its own fields (`python -m fdg_jax.main --help` lists them under it); a
  # config of another task calls tasks.configure(config, NAME).
  config.task = 'image_classification'
  # Network: image_classification: one of fdg_jax.models.MODEL_NAMES (resnet8/20/56/110,
  # resnet18, wrn28_10) or VIT_NAMES (vit_tiny); language_model: 'gpt' (sized by n_layer etc.).
  config.model = 'resnet56'
  # Images: 'cifar10' / 'cifar100' through tensorflow-datasets; 'cifar_python' (data_dir is an
  # extracted official cifar-10-batches-py or cifar-100-python folder); or 'imagefolder'
  # (data_dir holds train/<class>/* and test/<class>/* images, as a directory or .tar/.tar.gz
  # archive). Text: 'tiny_shakespeare' (tensorflow-datasets), 'textfile' (data_dir is a UTF-8
  # text file, or a folder of .txt files) or 'tokens' (data_dir holds nanoGPT's prepared
  # train.bin and val.bin, uint16 token ids, and optionally meta.pkl).
  config.dataset = 'cifar10'
  # tfds data directory ('' = tfds default), or the folder / archive of the local datasets.
  config.data_dir = ''
  # 'fdg' (this paper), 'bp' (the unsplit model, ordinary back-propagation on one device),
  # 'ddg' (Huo et al. 2018: forward-locked, delayed gradients), 'dgl' (Belilovsky et al.
  # 2019: each stage trains on an auxiliary classifier's local loss), or the synchronous
  # pipelines over config.microbatches, 'gpipe' and '1f1b' (BP's update, with a bubble);
  # `--help` lists them (fdg_jax.engine.methods.REGISTRY).
  config.method = 'fdg'
  # M, microbatches per batch: every method still makes one update per batch, with the mean
  # of its microbatches' gradients. 'gpipe' and '1f1b' pipeline the microbatches (BatchNorm
  # normalises each; grad_clip clips by the whole model's norm, as BP); 'bp' accumulates them;
  # 1 = the whole batch at once.
  config.microbatches = 1
  # K, the number of pipeline stages (ignored by 'bp', which is one stage).
  config.num_stages = 2
  # Block index where each stage after the first starts, e.g. (15,); () = balance by split_by.
  config.split = ()
  # What an automatic split balances: 'flops' (XLA's count) or 'time' (each block's forward and
  # backward measured at start on this device type; the stage table shows both shares).
  config.split_by = 'flops'
  # Global device index of each stage, e.g. (0, 1); one index puts every stage there, e.g. (0,)
  # to simulate any K on one device; () = stage k on device k. With data_parallel D, the
  # index of each stage's first device: stage k uses it and the next D - 1 devices.
  config.stage_devices = ()
  # D, devices per stage: each stage splits its batch over D devices and keeps its state on all
  # of them (K x D devices in all; BatchNorm still normalises over the whole batch, so the
  # numbers are those of D = 1 up to float rounding). 'bp' with D > 1 is data-parallel BP.
  config.data_parallel = 1
  # Gradient-shrinking factor in (0, 1]; each non-last stage scales its incoming cotangent.
  # The paper tunes it per row (Fig. 4a sweeps it on ResNet-20, K = 2); the row configs set the
  # paper's best beta (experiments/paper/published.py holds the paper's numbers and their
  # source).
  config.beta = 1.0
  # True (the paper): every non-last stage scales the cotangent it receives by beta, so stage
  # k's gradient carries beta^(K-1-k). False: only stage K-2 does, so every delayed stage's
  # gradient carries beta exactly once (pipeline.stage_betas; issue 28's per-stage beta).
  config.beta_compounds = True
  # What the delayed backward uses: 'vjp' (residuals saved at forward time: the paper's delayed
  # gradient) or 'recompute' (keep the input, recompute with current weights; less memory).
  config.stash = 'vjp'
  # With stash 'vjp': '' keeps every residual of jax.vjp; 'dots_saveable',
  # 'dots_with_no_batch_dims_saveable' or 'nothing_saveable' keep only what that jax.checkpoint
  # policy saves and recompute the rest from the saved input and old weights (same gradient,
  # less memory, more compute; see docs/record/memory_and_checkpoints.md for the measured
  # trade-off).
  config.residual_policy = ''
  # Stale-gradient compensation of the stages with a delayed gradient (fdg, ddg; the last stage
  # is never changed; docs/algorithm.md has the formulas): 'none' (the paper),
  # 'weight_prediction' (forward with the parameters extrapolated to the update the gradient
  # will be applied at; needs stash 'vjp'), 'delay_compensation' (DC-ASGD's correction
  # g + lambda * g * g * (theta_now - theta_forward); needs stash 'vjp') or 'lr_reschedule'
  # (PipeMare: learning rate divided by the delay early on, annealed to the schedule),
  # 'nesterov' (Ajanthan et al. 2025: the delayed stages' AdamW becomes NAdamW, SGD becomes
  # Nesterov SGD, momentum nesterov_momentum), 'delay_momentum' (each delayed stage's momentum
  # or adam_b1 raised with its delay towards delay_momentum_max), 'nesterov+delay_momentum',
  # 'error_feedback' (Zmushko et al. 2026: each stale stage's update u becomes
  # u + ef_coefficient * (u - its previous update), any optimizer) or 'basis_rotation' (Jung et
  # al. 2026: the delayed stages' AdamW runs in the eigenbasis of each attention and MLP
  # matrix's gradient covariances, refreshed every rotation_frequency updates; needs 'adamw').
  # Measured (docs/record/compensation.md, language_model.md): at K = 2 with SGD
  # 'weight_prediction' or 'nesterov' at nesterov_momentum 0.9, with AdamW 'weight_prediction'.
  # At K >= 4 microbatches first (M >= 2(K - 1)), then 'error_feedback' or 'weight_prediction'
  # (level within the errors): on the 8-layer GPT with Muon +0.005 / +0.011 nats from BP at
  # K = 4 and +0.013 / +0.011 at K = 8 (3 seeds each); with AdamW 'weight_prediction' or
  # 'nesterov' (about +0.04 at both); ResNet-20 K = 4, SGD, 'error_feedback': +0.12 points.
  # None wins without microbatches, so the default is the paper's 'none'.
  config.compensation = 'none'
  # delay_compensation: lambda0 of DC-ASGD-a (adaptive: divided by the root of the gradient's
  # running mean square), or lambda of DC-ASGD-c with dc_adaptive False (the paper: 0.04).
  config.dc_lambda = 2.0
  # delay_compensation: True = DC-ASGD-a (adaptive lambda), False = DC-ASGD-c (constant).
  config.dc_adaptive = True
  # delay_compensation, adaptive: decay of the gradient's running mean square (the paper: 0.95).
  config.dc_decay = 0.95
  # lr_reschedule: fraction of the training steps over which each stage's learning rate is
  # annealed from schedule / delay to the schedule (our default; PipeMare tunes its length).
  config.lr_reschedule_fraction = 0.25
  # nesterov: momentum (NAdamW's b1, Nesterov SGD's momentum) of the delayed stages (the
  # paper: 0.99; SGD's step grows as lr / (1 - momentum): with SGD set the recipe's momentum,
  # 0.9 here: 0.99 was worse than plain FDG on ResNet-20, 0.9 the best option).
  config.nesterov_momentum = 0.99
  # nesterov with adamw: NAdam's momentum decay psi, mu_t = b1 * (1 - 0.5 * 0.96 ** (t * psi))
  # (PyTorch's default, the paper's runs).
  config.nadam_momentum_decay = 0.004
  # delay_momentum: the momentum the rule approaches with the delay (the paper's code: 0.99).
  config.delay_momentum_max = 0.99
  # error_feedback: c in u + c * (u - u_previous), the correction's weight (the paper's 1).
  config.ef_coefficient = 1.0
  # basis_rotation and optimizer 'rotated_adamw': updates between refreshes of each matrix's
  # eigenbasis (the authors' 10).
  config.rotation_frequency = 10
  # basis_rotation, rotated_adamw: decay of the running gradient covariances G G^T and G^T G;
  # negative means adam_b2 (the authors' default).
  config.rotation_decay = -1.0
  # basis_rotation, rotated_adamw: 'bi' rotates both sides of each matrix (the authors'
  # default), 'uni' only its smaller dimension.
  config.rotation_geometry = 'bi'
  # Examples (images, token windows) per training batch.
  config.batch_size = 128
  # Length of training in epochs (used when num_train_steps is -1).
  config.num_epochs = 300
  # Length of training in steps (batches); -1 = num_epochs epochs.
  config.num_train_steps = -1
  # Peak learning rate (of either schedule).
  config.learning_rate = 0.1
  # SGD momentum (PyTorch convention: no dampening); AdamW ignores it.
  config.momentum = 0.9
  # 'sgd': added to the gradient before momentum (coupled, as PyTorch's SGD); 'adamw':
  # decoupled, lr * weight_decay * param, on weight matrices only.
  config.weight_decay = 5e-4
  # Epochs at which the learning rate is multiplied by lr_decay_factor.
  config.lr_boundaries_epochs = (150, 225, 275)
  # Factor applied at each lr boundary.
  config.lr_decay_factor = 0.1
  # Epochs of warm-up before the schedule starts, may be fractional (paper: 3 for ResNet-110,
  # K = 3, 4).
  config.warmup_epochs = 0.0
  # Learning rate during warm-up.
  config.warmup_lr = 0.01
  # 'constant': warm-up at warmup_lr throughout (the paper); 'linear': from warmup_lr at step 0
  # rising in a straight line to learning_rate at the end of warm-up (Goyal et al., 2017).
  config.warmup_shape = 'constant'
  # 'sgd' (momentum, weight decay coupled into the gradient, as PyTorch's SGD: the paper's),
  # 'adamw' (Adam with decoupled weight decay on weight matrices only, as nanoGPT) or 'muon'
  # (optax.contrib.muon, as Keller Jordan's Muon and the nanoGPT speedruns use it: Muon on the
  # hidden layers' matrices and conv kernels (a conv's (h, w, in, out) read as an (h w in, out)
  # matrix), this AdamW at learning_rate on the rest: embeddings, the first layer (a stem conv,
  # a patch projection), the head, biases, norm scales, DGL's heads; engine/optimizers.py:
  # muon_dimension_numbers), or 'rotated_adamw' (that AdamW with Adam in the eigenbasis of each
  # attention and MLP matrix's gradient covariances, the rotation_* fields: what compensation
  # basis_rotation gives the delayed stages, on every stage). The look-ahead compensations
  # (nesterov, delay_momentum) refuse 'muon' and 'rotated_adamw'.
  config.optimizer = 'sgd'
  # muon: peak learning rate of Muon's matrices (Keller Jordan's default 0.02); it follows
  # lr_schedule's shape, scaled by muon_learning_rate / learning_rate.
  config.muon_learning_rate = 0.02
  # muon: momentum of Muon's matrices (its beta; Keller Jordan's 0.95).
  config.muon_momentum = 0.95
  # muon: Nesterov momentum, as Muon's authors run it (False: plain momentum).
  config.muon_nesterov = True
  # muon: Newton-Schulz steps orthogonalising each update (Muon's 5).
  config.muon_ns_steps = 5
  # muon: decoupled weight decay of Muon's matrices, lr * muon_weight_decay * param (AdamW's
  # parameters take weight_decay).
  config.muon_weight_decay = 0.0
  # AdamW's beta1 (first-moment decay).
  config.adam_b1 = 0.9
  # AdamW's beta2 (second-moment decay; nanoGPT: 0.95, 0.99 for its small shakespeare_char).
  config.adam_b2 = 0.95
  # AdamW's epsilon (PyTorch's default).
  config.adam_eps = 1e-8
  # AdamW: also decay embedding tables (nn.Embed 'embedding', the ViT's 'position_embedding');
  # nanoGPT does, DeiT and big_vision's ViTs don't, we don't by default.
  config.decay_embeddings = False
  # 'piecewise' (warmup_epochs, then lr_decay_factor at lr_boundaries_epochs) or
  # 'warmup_cosine' (nanoGPT's: linear warm-up over warmup_steps, cosine to min_learning_rate
  # at lr_decay_steps, constant after).
  config.lr_schedule = 'piecewise'
  # warmup_cosine: steps of linear warm-up, lr * (step + 1) / (warmup_steps + 1) (nanoGPT).
  config.warmup_steps = 0
  # warmup_cosine: the step at which the cosine reaches min_learning_rate (> warmup_steps).
  config.lr_decay_steps = 0
  # warmup_cosine: the learning rate after lr_decay_steps (nanoGPT: learning_rate / 10).
  config.min_learning_rate = 0.0
  # Clip each stage's gradient to this global norm before the optimizer (0 = off). Per stage:
  # in a decoupled pipeline no stage sees the whole model's gradient ('bp': the whole model's).
  config.grad_clip = 0.0
  # Dropout rate inside WRN blocks and the transformers (the ResNets have none).
  config.dropout_rate = 0.0
  # Seed of initialisation, data order and augmentation.
  config.seed = 0
  # Another run's workdir whose network starts this new run (fine-tuning): the parameters and
  # BatchNorm statistics of its latest checkpoint, its batches in flight completed; the
  # optimizer state, schedule, data, length, method and K are this run's. The model's fields
  # must be the same (a language model also keeps that run's vocabulary and encodes its own
  # text in it). The run is evaluated once before its first step; --workdir must be new (or
  # hold this run, interrupted: it resumes). '' = initialise from the seed.
  config.init_from = ''
  # Train nothing: evaluate the run in --workdir at its latest checkpoint (its batches in
  # flight completed, as after its last step) on the evaluation split, log the result and
  # write WORKDIR/eval_summary.json; no other file of the run changes. Give the run's own
  # config (the resumable fields, e.g. eval_batch_size, may differ).
  config.eval_only = False
  # Evaluate the composed model on the test split every this many epochs (0 = only at the end).
  config.eval_every_epochs = 1
  # Evaluate every this many steps instead (0 = use eval_every_epochs).
  config.eval_every_steps = 0
  # Write training metrics and the progress line every this many steps.
  config.log_every_steps = 100
  # Save a checkpoint every this many steps (0 = only at the end and on SIGTERM/SIGINT).
  config.checkpoint_every_steps = 1000
  # Record a profiler timeline of timeline_num_steps steps from this step (0 = off): a Gantt
  # chart of when each stage's device work runs, WORKDIR/timeline.png (trace in WORKDIR/timeline).
  config.timeline_start_step = 0
  # Length of the recorded window, in steps.
  config.timeline_num_steps = 8
  # Examples per evaluation batch.
  config.eval_batch_size = 500
  # The task's own fields, at their defaults.
  return tasks.configure(config, config.task)
