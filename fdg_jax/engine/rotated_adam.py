"""Adam in a rotated basis (Jung, Shin, Lee, "Mitigating Staleness in Asynchronous Pipeline
Parallelism via Basis Rotation", ICML 2026, arXiv 2602.03515; their code
github.com/joonkyoo/basis-rotation, optim/basis_rotation.py).

On each transformer block's attention and MLP matrix (`rotated_matrices`), Adam runs in the
eigenbasis of the gradient's covariances G G^T and G^T G (SOAP-like), refreshed every `frequency`
updates (`scale_by_rotated_adam`). It is an optimizer in its own right ('rotated_adamw' in
optimizers.py, the run's AdamW elsewhere), and the compensation 'basis_rotation' gives it to the
delayed stages only (compensation.py). Memory: per rotated r x c matrix, two r x r and two c x c
matrices ('bi'). docs/algorithm.md has the update and its source.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# Rotation geometries: both sides of each matrix, or only its smaller one.
ROTATION_GEOMETRIES = ('bi', 'uni')
# The modules whose matrices are rotated: the transformer blocks' attention and MLP (the
# authors' target_modules_list, optim/optimizer.py; theirs also names 'sa' and 'ffwd').
ROTATED_MODULES = ('attn', 'mlp')


def check_rotation(frequency: int, decay: float, geometry: str) -> None:
  """ValueError naming the bad rotation hyperparameter and a fix."""
  if frequency < 1:
    raise ValueError(f'rotation_frequency={frequency}: refresh the basis every 1 or more '
                     'updates (the authors: 10).')
  if decay >= 1:
    raise ValueError(f'rotation_decay={decay} is not below 1; use e.g. 0.999, or a negative '
                     "value for AdamW's b2 (the authors' default).")
  if geometry not in ROTATION_GEOMETRIES:
    raise ValueError(f'rotation_geometry={geometry!r} is not one of {ROTATION_GEOMETRIES}.')


def rotated_matrices(params):
  """True for the parameters rotated Adam rotates: the 2-D kernels inside a module named in
  ROTATED_MODULES (the GPT's and the ViT's attention and MLP matrices); False for the rest
  (embeddings, the head, norms, biases, convolutions), which keep AdamW, as the authors' code."""
  def rotated(path, leaf):
    names = [getattr(key, 'key', None) for key in path]
    return (jnp.ndim(leaf) == 2 and bool(names) and names[-1] == 'kernel'
            and any(name in ROTATED_MODULES for name in names[:-1]))
  return jax.tree_util.tree_map_with_path(rotated, params)


class RotatedAdamState(NamedTuple):
  count: Any         # updates made (int32)
  mu: Any            # Adam's first moment m, in the matrix's own basis
  nu: Any            # Adam's second moment v, in the rotated basis
  left: Any          # per matrix: EMA of G G^T (r x r), or a 0 x 0 array where not rotated
  right: Any         # EMA of G^T G (c x c), or 0 x 0
  left_basis: Any    # Q_L, its eigenbasis (columns by descending eigenvalue), or 0 x 0
  right_basis: Any   # Q_R, or 0 x 0


def rotated_sides(shape, geometry: str) -> tuple[bool, bool]:
  """Which sides of an (r, c) kernel are rotated: both ('bi'), or ('uni') only the smaller
  dimension, the input one (r) if square: the authors' rule on PyTorch's (out, in) weights."""
  rows, cols = shape
  if geometry == 'bi':
    return True, True
  return rows <= cols, rows > cols


def scale_by_rotated_adam(b1: float, b2: float, eps: float, decay: float, frequency: int,
                          geometry: str) -> optax.GradientTransformation:
  """Adam with Basis Rotation (the authors' `BasisRotation.step`, rotation from the gradient's
  second-order statistics, "2nd"), before the learning rate and decoupled decay, for 2-D leaves.

  Update t (1 for the first) of a matrix with gradient G:
    L <- decay L + (1 - decay) G G^T,  R <- decay R + (1 - decay) G^T G   (the rotated sides)
    t = 1: Q_L, Q_R = eigenvectors of L, R by descending eigenvalue;
    t % frequency == 0: per side, order the columns of Q by descending diag(Q^T L Q) (v's rows
      or columns in the same order), then Q <- the Q of the QR factorisation of L Q;
    m <- b1 m + (1 - b1) G,  v <- b2 v + (1 - b2) (Q_L^T G Q_R)^2,
    direction = sqrt(1 - b2^t) / (1 - b1^t) * Q_L ((Q_L^T m Q_R) / (sqrt(v) + eps)) Q_R^T.
  A side not rotated ('uni') has Q = I.
  """

  def init_fn(params):
    def square(leaf, side):
      size = jnp.shape(leaf)[side] if rotated_sides(jnp.shape(leaf), geometry)[side] else 0
      return jnp.zeros((size, size), leaf.dtype)
    zeros = lambda p: jax.tree_util.tree_map(jnp.zeros_like, p)
    return RotatedAdamState(
        count=jnp.zeros([], jnp.int32), mu=zeros(params), nu=zeros(params),
        left=jax.tree_util.tree_map(lambda p: square(p, 0), params),
        right=jax.tree_util.tree_map(lambda p: square(p, 1), params),
        left_basis=jax.tree_util.tree_map(lambda p: square(p, 0), params),
        right_basis=jax.tree_util.tree_map(lambda p: square(p, 1), params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    t = count.astype(jnp.float32)
    # 0: keep the bases, 1: the first eigendecomposition, 2: a refresh (QR on the last bases)
    refresh = jnp.where(count == 1, 1, jnp.where(count % frequency == 0, 2, 0))
    scale = jnp.sqrt(1.0 - jnp.power(jnp.float32(b2), t)) / (1.0 - jnp.power(jnp.float32(b1), t))

    def one(g, m, v, left, right, q_left, q_right):
      use_left, use_right = rotated_sides(g.shape, geometry)
      if use_left:
        left = decay * left + (1 - decay) * (g @ g.T)
      if use_right:
        right = decay * right + (1 - decay) * (g.T @ g)

      def keep(v, q_left, q_right):
        return v, q_left, q_right

      def first(v, q_left, q_right):
        descending = lambda s: jnp.linalg.eigh(s)[1][:, ::-1]
        return (v, descending(left) if use_left else q_left,
                descending(right) if use_right else q_right)

      def again(v, q_left, q_right):
        def refreshed(s, q, v, axis):
          order = jnp.argsort(-jnp.diag(q.T @ s @ q), stable=True)
          return jnp.linalg.qr(s @ q[:, order])[0], jnp.take(v, order, axis=axis)
        if use_left:
          q_left, v = refreshed(left, q_left, v, 0)
        if use_right:
          q_right, v = refreshed(right, q_right, v, 1)
        return v, q_left, q_right

      v, q_left, q_right = jax.lax.switch(refresh, (keep, first, again), v, q_left, q_right)

      def rotate(x):
        x = q_left.T @ x if use_left else x
        return x @ q_right if use_right else x

      def rotate_back(x):
        x = q_left @ x if use_left else x
        return x @ q_right.T if use_right else x

      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * jnp.square(rotate(g))
      direction = scale * rotate_back(rotate(m) / (jnp.sqrt(v) + eps))
      return direction.astype(g.dtype), m, v, left, right, q_left, q_right

    leaves, treedef = jax.tree_util.tree_flatten(updates)
    fields = [treedef.flatten_up_to(tree) for tree in (
        state.mu, state.nu, state.left, state.right, state.left_basis, state.right_basis)]
    columns = list(zip(*(one(*leaf) for leaf in zip(leaves, *fields)))) or [()] * 7
    direction, mu, nu, left, right, q_left, q_right = (
        treedef.unflatten(list(column)) for column in columns)
    return direction, RotatedAdamState(count=count, mu=mu, nu=nu, left=left, right=right,
                                       left_basis=q_left, right_basis=q_right)

  return optax.GradientTransformation(init_fn, update_fn)
