"""The GPT and ViT block lists (fdg_jax.models.gpt, fdg_jax.models.vit) against independent unsplit references
written here in plain jax.numpy, their splits, and FDG on a tiny GPT against the naive reference
of test_engine."""

import functools
import math

import chex
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdg_jax.engine import baselines
from fdg_jax.engine import pipeline
from fdg_jax import models
from fdg_jax.models import gpt
from fdg_jax.models import partition
from fdg_jax.models import vit
from test_engine import BETA, naive_fdg

N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, VOCAB = 2, 2, 16, 8, 11
BATCH = 3


def _key(seed):
  return jax.random.key(seed, impl='rbg')   # XLA:CPU compiles threefry slowly (test_models)


def _tokens(seed=0, batch=BATCH, length=BLOCK_SIZE):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, VOCAB, size=(batch, length)), jnp.int32)


def _perturbed(params, seed=1, scale=0.3):
  """Init leaves plus noise: zero biases and unit LayerNorm scales would hide their misuse."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: a + rng.normal(scale=scale, size=a.shape).astype(a.dtype), params)


def _init(blocks, sample):
  model = partition.StageModule(tuple(blocks))
  return model, jax.jit(lambda x: model.init(_key(0), x, train=False))(sample)


def _predict(model, variables, x):
  return jax.jit(functools.partial(model.apply, train=False))(variables, x)   # eager is slower


# ------------------------------------------------------------ the reference, in plain jnp

def _layer_norm(p, x):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-5) * p['scale'] + p.get('bias', 0.0)


def _linear(p, x):
  return x @ p['kernel'] + p.get('bias', 0.0)


def _attention(p, x, n_head, causal):
  b, t, c = x.shape
  heads = lambda a: a.reshape(b, t, n_head, c // n_head).transpose(0, 2, 1, 3)  # (B, H, T, D)
  q, k, v = map(heads, jnp.split(_linear(p['c_attn'], x), 3, axis=-1))
  att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(c // n_head)
  if causal:
    att = jnp.where(np.tril(np.ones((t, t), bool)), att, -jnp.inf)
  att = jnp.exp(att - att.max(-1, keepdims=True))
  att = att / att.sum(-1, keepdims=True)
  y = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, c)
  return _linear(p['c_proj'], y)


def _block(p, x, n_head, causal):
  x = x + _attention(p['attn'], _layer_norm(p['ln_1'], x), n_head, causal)
  h = _linear(p['mlp']['c_fc'], _layer_norm(p['ln_2'], x))
  h = 0.5 * h * (1.0 + jax.scipy.special.erf(h / math.sqrt(2.0)))   # exact GELU
  return x + _linear(p['mlp']['c_proj'], h)


def reference_gpt(params, tokens, n_layer, n_head):
  """nanoGPT's forward (eval mode, untied head) from the unsplit model's parameters."""
  embedding = params['blocks_0']
  x = embedding['wte']['embedding'][tokens] + embedding['wpe']['embedding'][:tokens.shape[1]]
  for i in range(1, n_layer + 1):
    x = _block(params[f'blocks_{i}'], x, n_head, causal=True)
  head = params[f'blocks_{n_layer + 1}']
  return _layer_norm(head['ln_f'], x) @ head['lm_head']['kernel']


def reference_vit(params, images, depth, num_heads, patch):
  """Patches flattened and projected by a matmul, position embedding, blocks, LN, mean, Dense."""
  b, h, w, c = images.shape
  stem = params['blocks_0']
  patches = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, (h // patch) * (w // patch), patch * patch * c)
  kernel = stem['projection']['kernel'].reshape(patch * patch * c, -1)
  x = patches @ kernel + stem['projection']['bias'] + stem['position_embedding']
  for i in range(1, depth + 1):
    x = _block(params[f'blocks_{i}'], x, num_heads, causal=False)
  head = params[f'blocks_{depth + 1}']
  return _linear(head['fc'], _layer_norm(head['ln_f'], x).mean(axis=1))


# ------------------------------------------------------------ the tests

def _tiny_gpt(**kwargs):
  blocks = gpt.create_blocks(N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, VOCAB, **kwargs)
  model, variables = _init(blocks, _tokens())
  return blocks, model, {'params': _perturbed(variables['params'])}


def _all_splits(num_blocks):
  return [tuple(s for s in range(1, num_blocks) if mask >> (s - 1) & 1)
          for mask in range(1, 2 ** (num_blocks - 1))]


def test_gpt_blocks_equal_the_reference_and_every_split_equals_them():
  blocks, model, variables = _tiny_gpt(bias=True)
  tokens = _tokens(seed=2)
  logits = _predict(model, variables, tokens)
  assert logits.shape == (BATCH, BLOCK_SIZE, VOCAB) and logits.dtype == jnp.float32
  expected = jax.jit(reference_gpt, static_argnums=(2, 3))(variables['params'], tokens, N_LAYER,
                                                           N_HEAD)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  assert gpt.block_names(N_LAYER) == ['embedding', 'block1', 'block2', 'head']
  for split in _all_splits(len(blocks)):     # 7 splits of 4 blocks
    partition.check_composition(
        model, variables, partition.build_stages(blocks, split),
        partition.split_variables(variables, split, len(blocks)), tokens)


def test_gpt_defaults_follow_nanogpt_init_without_biases():
  blocks = gpt.create_blocks(N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, VOCAB)
  params = _init(blocks, _tokens())[1]['params']
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert not any('bias' in p for p in paths), paths
  # The residual projections at 0.02 / sqrt(2 n_layer) = 0.01, the other weights at 0.02.
  std = lambda a: float(np.std(np.asarray(a)))
  assert abs(std(params['blocks_1']['mlp']['c_fc']['kernel']) - 0.02) < 0.002
  assert abs(std(params['blocks_1']['mlp']['c_proj']['kernel']) - 0.01) < 0.001
  assert abs(std(params['blocks_2']['attn']['c_proj']['kernel']) - 0.01) < 0.0015
  assert abs(std(params['blocks_0']['wte']['embedding']) - 0.02) < 0.003


def test_gpt_is_causal():
  _, model, variables = _tiny_gpt()
  tokens = _tokens(seed=3)
  t = 5
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
  before, after = (_predict(model, variables, x) for x in (tokens, changed))
  np.testing.assert_allclose(before[:, :t], after[:, :t], rtol=0, atol=1e-6)
  assert np.all(np.abs(before[:, t:] - after[:, t:]).max(axis=-1) > 1e-4)


def test_gpt_bfloat16_computes_in_bfloat16_with_float32_params_and_logits():
  _, model, variables = _tiny_gpt()
  blocks16 = gpt.create_blocks(N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, VOCAB, dtype='bfloat16')
  model16, init16 = _init(blocks16, _tokens())
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(init16))
  tokens = _tokens(seed=4)
  logits16 = _predict(model16, variables, tokens)
  assert logits16.dtype == jnp.float32
  assert 'bf16' in str(jax.make_jaxpr(lambda v: model16.apply(v, tokens, train=False))(variables))
  logits = _predict(model, variables, tokens)
  scale = float(jnp.abs(logits).max())
  np.testing.assert_allclose(logits16, logits, atol=0.05 * scale)
  assert not np.array_equal(logits16, logits)


def test_vit_blocks_equal_the_reference_and_a_split_equals_them():
  depth, heads, width, patch, size = 2, 2, 16, 4, 8
  blocks = vit.create_blocks(5, depth, heads, width, patch_size=patch, image_size=size)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size, 3)), jnp.float32)
  model, variables = _init(blocks, images)
  variables = {'params': _perturbed(variables['params'])}
  logits = _predict(model, variables, images)
  assert logits.shape == (2, 5)
  expected = jax.jit(reference_vit, static_argnums=(2, 3, 4))(variables['params'], images, depth,
                                                              heads, patch)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  split = (2,)
  partition.check_composition(model, variables, partition.build_stages(blocks, split),
                              partition.split_variables(variables, split, len(blocks)), images)


def test_vit_tiny_in_the_zoo():
  blocks = models.create_blocks('vit_tiny', 10, dropout_rate=0.1)
  names = models.block_names('vit_tiny')
  assert names == ['patch_embedding'] + [f'block{i}' for i in range(1, 7)] + ['head']
  assert len(blocks) == len(names) and blocks[1].dropout_rate == 0.1
  model = partition.StageModule(tuple(blocks))
  variables = jax.eval_shape(lambda: model.init(_key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert partition.count_params(variables['params']) == 2_693_194
  assert 'vit_tiny' in models.VIT_NAMES


@pytest.mark.parametrize('kwargs, message', [
    (dict(n_embd=15), 'not divisible by n_head'),
    (dict(dropout_rate=1.0), 'outside'),
    (dict(dtype='float16'), 'not one of'),
])
def test_gpt_rejects_bad_arguments(kwargs, message):
  args = dict(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, block_size=BLOCK_SIZE,
              vocab_size=VOCAB) | kwargs
  with pytest.raises(ValueError, match=message):
    gpt.create_blocks(**args)


def test_gpt_rejects_sequences_longer_than_block_size():
  blocks = gpt.create_blocks(N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, VOCAB)
  with pytest.raises(ValueError, match='exceeds block_size'):
    blocks[0].init(_key(0), _tokens(length=BLOCK_SIZE + 1), train=False)


def test_block_flops_of_the_gpt_and_a_balanced_split():
  n_layer = 4
  blocks = gpt.create_blocks(n_layer, N_HEAD, N_EMBD, BLOCK_SIZE, VOCAB)
  flops = partition.block_flops(blocks, (BATCH, BLOCK_SIZE), dtype=jnp.int32)
  assert len(flops) == n_layer + 2 and all(f > 0 for f in flops[1:])
  assert len(set(flops[1:-1])) == 1     # identical blocks cost the same
  for num_stages in (2, 4):             # each stage gets n_layer / K transformer blocks
    ranges = partition.stage_ranges(partition.balanced_split(flops, num_stages), len(blocks))
    per_stage = [len(set(range(a, b)) & set(range(1, n_layer + 1))) for a, b in ranges]
    assert per_stage == [n_layer // num_stages] * num_stages, (num_stages, ranges)


class _WrittenOutAttention(nn.Module):
  """The GPT's attention as it was before `jax.nn.dot_product_attention` (the reference of the
  test below): scores in float32, -inf above the diagonal, softmax, dropout on the weights."""
  n_head: int
  n_embd: int
  n_layer: int
  dropout_rate: float = 0.0
  bias: bool = False
  causal: bool = True
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    batch, length, _ = x.shape
    head_size = self.n_embd // self.n_head
    qkv = gpt.dense(3 * self.n_embd, self.bias, self.dtype, 'c_attn')(x)
    q, k, v = (a.reshape(batch, length, self.n_head, head_size)
               for a in jnp.split(qkv, 3, axis=-1))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(head_size))
    if self.causal:
      allowed = jnp.tril(jnp.ones((length, length), bool))
      scores = jnp.where(allowed, scores, -jnp.inf)
    weights = nn.softmax(scores, axis=-1)
    weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
    y = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)
    y = y.reshape(batch, length, self.n_embd)
    y = gpt.dense(self.n_embd, self.bias, self.dtype, 'c_proj', gpt.residual_init(self.n_layer))(y)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('causal', [True, False], ids=['causal', 'vit'])
@pytest.mark.parametrize('implementation', gpt.ATTENTION_IMPLEMENTATIONS)
def test_every_attention_implementation_equals_the_attention_before_them(implementation,
                                                                         causal, dtype):
  """The outputs, and in float32 the gradients, of each way the attention runs (on this
  platform: 'cudnn' falls back to XLA's `jax.nn.dot_product_attention` on CPU) against the
  attention as it was before they existed; causal (the GPT) and not (the ViT's blocks). With
  attention dropout in training the same weights are dropped."""
  dtype = gpt.compute_dtype(dtype)
  args = (N_HEAD, N_EMBD, N_LAYER)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, BLOCK_SIZE, N_EMBD)), jnp.float32)
  new = gpt.SelfAttention(*args, bias=True, causal=causal, dtype=dtype,
                          implementation=implementation)
  old = _WrittenOutAttention(*args, bias=True, causal=causal, dtype=dtype)
  params = _perturbed(new.init(_key(0), x, train=False)['params'])
  apply = lambda module, p, x: module.apply({'params': p}, x, train=False)
  got, expected = (jax.jit(functools.partial(apply, m))(params, x) for m in (new, old))
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    loss = lambda module: lambda p, x: jnp.sum(jnp.sin(apply(module, p, x)))
    grads = [jax.jit(jax.grad(loss(m), argnums=(0, 1)))(params, x) for m in (new, old)]
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
  else:
    scale = float(jnp.abs(expected.astype(jnp.float32)).max())
    np.testing.assert_allclose(got.astype(jnp.float32), expected.astype(jnp.float32),
                               atol=0.05 * scale)
  dropped = [m.clone(dropout_rate=0.3) for m in (new, old)]
  train = lambda module: jax.jit(lambda p, x: module.apply(
      {'params': p}, x, train=True, rngs={'dropout': _key(4)}))
  np.testing.assert_array_equal(train(dropped[0])(params, x), train(dropped[1])(params, x))


def test_attention_implementation_is_chosen_per_platform():
  gpu = jax.default_backend() == 'gpu'
  assert gpt.attention_implementation(None, jnp.bfloat16) == ('cudnn' if gpu else 'plain')
  assert gpt.attention_implementation(None, jnp.float32) == ('xla' if gpu else 'plain')
  assert gpt.attention_implementation('cudnn', jnp.bfloat16) == ('cudnn' if gpu else 'xla')
  assert gpt.attention_implementation('cudnn', jnp.float32) == 'xla'   # cuDNN: 16-bit only
  assert gpt.attention_implementation('xla', jnp.bfloat16) == 'xla'
  with pytest.raises(ValueError, match="'flash' is not one of"):
    gpt.create_blocks(N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, VOCAB, implementation='flash')


@pytest.mark.parametrize('bias', [False, True])
def test_flops_per_token_against_a_hand_count(bias):
  """PaLM's 6 N + 12 L H Q T (nanoGPT's estimate_mfu), counted by hand for the tiny GPT
  (L = 2, H = 2, Q = 8, C = 16, T = 8, V = 11): N is every parameter but the two embedding
  tables."""
  c = N_EMBD
  per_block = (3 * c * c + c * c) + (4 * c * c + 4 * c * c) + 2 * c   # attention, MLP, LN scales
  if bias:
    per_block += 3 * c + c + 4 * c + c + 2 * c   # c_attn, c_proj, c_fc, c_proj, LN biases
  n = N_LAYER * per_block + (2 * c if bias else c) + c * VOCAB   # ln_f, the LM head
  expected = 6 * n + 12 * N_LAYER * N_HEAD * (N_EMBD // N_HEAD) * BLOCK_SIZE
  assert gpt.flops_per_token(N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, VOCAB, bias) == expected
  assert expected == (41_472 if not bias else 43_680)   # 6 x 6,400 + 3,072; 6 x 6,768 + 3,072
  blocks = gpt.create_blocks(N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, VOCAB, bias=bias)
  params = _init(blocks, _tokens())[1]['params']
  embeddings = partition.count_params(params['blocks_0'])   # wte and wpe
  assert partition.count_params(params) - embeddings == n


def _lm_batches(num_batches, seed=5):
  rng = np.random.default_rng(seed)
  return [tuple(rng.integers(0, VOCAB, size=(BATCH, BLOCK_SIZE)).astype(np.int32)
                for _ in range(2)) for _ in range(num_batches)]


def backprop(model, params, optimizer, batches):
  """Plain back-propagation, one update per batch: FDG at K = 1. (naive_fdg differentiates its
  last stage with respect to the stage input, which at K = 1 is the integer tokens.)"""
  @jax.jit
  def step(params, opt_state, tokens, labels):
    grads = jax.grad(lambda p: jnp.mean(pipeline.cross_entropy_loss(
        model.apply({'params': p}, tokens, train=True), labels)))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  for tokens, labels in batches:
    params, opt_state = step(params, opt_state, tokens, labels)
  return [params]


@pytest.mark.parametrize('num_stages', [1, 2, pytest.param(3, marks=pytest.mark.slow),
                                        pytest.param(4, marks=pytest.mark.slow)])
def test_fdg_on_a_tiny_gpt_matches_the_naive_reference(num_stages):
  blocks = gpt.create_blocks(N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, VOCAB)
  split = partition.balanced_split([1.0] * len(blocks), num_stages)
  model, variables = _init(blocks, _tokens())
  stage_variables = [{'params': v['params'], 'batch_stats': {}}
                     for v in partition.split_variables(variables, split, len(blocks))]
  stages = partition.build_stages(blocks, split)
  batches = _lm_batches(6)
  optimizer = optax.adamw(1e-3, weight_decay=0.1)
  pipe = pipeline.Pipeline(stages, optimizer, pipeline.cross_entropy_loss, beta=BETA,
                           placements=jax.devices()[:num_stages])
  state = pipe.init(jax.random.key(1), batches[0][0], variables=stage_variables)
  for tokens, labels in batches:   # per-token losses (B, T); the engine and naive_fdg average
    state, _ = pipe.step(state, tokens, labels)
  state, _ = pipe.drain(state)
  if num_stages == 1:
    expected = backprop(model, variables['params'], optimizer, batches)
  else:
    expected = [v['params'] for v in
                naive_fdg(stages, stage_variables, optimizer, batches, BETA, 'vjp')[0]]
  got = [v['params'] for v in jax.device_get(pipe.stage_variables(state))]
  chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-6)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), got[0], stage_variables[0]['params'])
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_dgl_trains_a_tiny_gpt_with_the_lm_aux_head():
  """gpt.aux_head fits DGLPipeline's (stage, num_classes) factory: stage 0 trains with an LM head
  of its own on its (B, T, n_embd) output, on that head's loss alone; stage 1 on the model's loss
  of stage 0's pre-update output. Both against a naive reference of that rule."""
  blocks = gpt.create_blocks(N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, VOCAB)
  split = (2,)
  _, variables = _init(blocks, _tokens())
  stage_variables = partition.split_variables(variables, split, len(blocks))
  stages = partition.build_stages(blocks, split)
  optimizer = optax.adamw(1e-2)
  pipe = baselines.DGLPipeline(stages, optimizer, num_classes=VOCAB, aux_head=gpt.aux_head,
                               placements=jax.devices()[:2])
  batches = _lm_batches(3)
  state = pipe.init(jax.random.key(1), batches[0][0], variables=stage_variables)
  [aux_initial] = jax.device_get(pipe.aux_variables(state))   # before the first (donating) step
  for tokens, labels in batches:
    state, _ = pipe.step(state, tokens, labels)
  state, _ = pipe.drain(state)
  [aux] = jax.device_get(pipe.aux_variables(state))
  assert aux['params']['lm_head']['kernel'].shape == (N_EMBD, VOCAB)
  got = jax.device_get(pipe.stage_variables(state))

  def mean_ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  head = gpt.aux_head(0, VOCAB)
  params = [{'stage': stage_variables[0]['params'], 'aux': aux_initial['params']},
            stage_variables[1]['params']]
  opt_states = [optimizer.init(p) for p in params]
  for tokens, labels in batches:   # naive: one batch at a time through both stages
    y = stages[0].apply({'params': params[0]['stage']}, tokens, train=True)   # sent on
    losses = (lambda p: mean_ce(head.apply({'params': p['aux']}, stages[0].apply(
                  {'params': p['stage']}, tokens, train=True), train=True), labels),
              lambda p: mean_ce(stages[1].apply({'params': p}, y, train=True), labels))
    for k in range(2):
      updates, opt_states[k] = optimizer.update(jax.grad(losses[k])(params[k]), opt_states[k],
                                                params[k])
      params[k] = optax.apply_updates(params[k], updates)
  chex.assert_trees_all_close(got[0]['params'], params[0]['stage'], rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(aux['params'], params[0]['aux'], rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(got[1]['params'], params[1], rtol=1e-4, atol=1e-6)
