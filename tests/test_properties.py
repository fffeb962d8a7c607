"""Property-based tests (hypothesis) of the mechanism in docs/privacy_contract.md.

Random pytrees (dict/list/tuple nesting, scalar to 3-d leaves, float32/bfloat16/
float16 leaves, float64 too when JAX runs with x64) and hyper-parameters (clip
norm 1e-4..1e4, gradient norms from 1e-30 to 1e25, batch size from 1,
expected_batch_size, noise multiplier) check:

1. every clipped contribution has global norm <= C (within a stated float32 bound);
2. with noise 0, dp_aggregate is the float64 clipped sum / expected_batch_size;
3. a padding (masked) example's data, NaN/inf/huge included, never changes anything;
4. the clipped sum is linear in the mask and equals sum_{mask} clip_C(g_i);
5. the noise is N(0, (sigma C / expected_batch_size)^2) per coordinate, uncorrelated
   across leaves and steps (chi-square / exact Beta tests, false alarm <= 1e-9 per example);
6. dp_accumulate over k chunks equals dp_aggregate on their concatenation.

Every tolerance is derived, not tuned, from the standard rounding model
fl(a op b) = (a op b)(1 + d), |d| <= u (u = 2^-24 for float32), gamma_k =
k u / (1 - k u) for a k-term sum or product chain (Higham, "Accuracy and
Stability of Numerical Algorithms", ch. 3), plus one smallest subnormal per
operation for underflow. Hypothesis runs derandomized with no example database,
so CI sees the same examples on every run; the PRNG keys of the noise tests come
from the hypothesis draw.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from scipy import stats

import optax_dp
from optax_dp._clip import _clipping

U32 = 2.0 ** -24          # float32 unit roundoff
SUB32 = 2.0 ** -149       # float32 smallest subnormal
U64 = 2.0 ** -53
F32MAX = float(np.finfo(np.float32).max)
NARROW = [jnp.float32, jnp.bfloat16, jnp.float16]
DTYPES = NARROW + ([jnp.float64] if jax.config.jax_enable_x64 else [])
FALSE_ALARM = 1e-9        # per hypothesis example, for the statistical properties


def _settings(n):
  """`n` examples in the full suite (hypothesis profile "ci"), a quarter (at
  least 2) in the fast tier (profile "dev"; tests/conftest.py)."""
  scale = settings.default.max_examples / 100
  return settings(max_examples=max(2, math.ceil(n * scale)),
                  deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])


# ----------------------------------------------------------------------------------
# Random pytrees.


class _Leaf:
  """A leaf spec (shape of one example's leaf, dtype): an opaque pytree leaf."""

  def __init__(self, shape, dtype):
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)

  @property
  def size(self):
    return int(np.prod(self.shape, dtype=np.int64))

  def __repr__(self):
    return f"Leaf({self.shape}, {self.dtype.name})"


def _specs(dtypes=st.sampled_from(DTYPES), max_dim=5, max_leaves=5):
  """Pytrees of _Leaf: nested dicts, lists and tuples of any depth."""
  leaf = st.builds(_Leaf, st.lists(st.integers(1, max_dim), max_size=3), dtypes)
  keys = st.sampled_from("abcdefgh")

  def extend(children):
    return st.one_of(st.dictionaries(keys, children, min_size=1, max_size=3),
                     st.lists(children, min_size=1, max_size=3),
                     st.lists(children, min_size=1, max_size=3).map(tuple))

  return st.recursive(leaf, extend, max_leaves=max_leaves)


def _leaves(spec):
  return jax.tree.leaves(spec)


def _size(spec):
  return sum(l.size for l in _leaves(spec))


def _cast(x, dtype):
  with np.errstate(over="ignore", invalid="ignore"):
    return jnp.asarray(np.asarray(x).astype(dtype))


def _per_example_tree(spec, log_norms, rng, bad=None):
  """Example i: a random direction with global norm 10**log_norms[i], cast per leaf.

  `bad[i]` in {None, "nan", "inf", "-inf"} poisons one coordinate of example i.
  Casting may overflow (float16: inf, so the example is non-finite) or underflow;
  every reference below reads the values back from the arrays actually built.
  """
  leaves, treedef = jax.tree.flatten(spec)
  batch = len(log_norms)
  z = [rng.standard_normal((batch,) + l.shape) for l in leaves]
  norms = np.sqrt(sum(np.sum(x.reshape(batch, -1) ** 2, axis=1) for x in z))
  scale = 10.0 ** np.asarray(log_norms, np.float64) / np.maximum(norms, 1e-300)
  z = [x * scale.reshape((-1,) + (1,) * (x.ndim - 1)) for x in z]
  for i, kind in enumerate(bad or []):
    if kind is not None:
      j = int(rng.integers(len(z)))
      z[j].reshape(batch, -1)[i, int(rng.integers(max(1, leaves[j].size)))] = float(kind)
  return jax.tree.unflatten(treedef, [_cast(x, l.dtype) for x, l in zip(z, leaves)])


REGIMES = ("inside", "outside", "mixed", "boundary", "extreme")


def _log_offsets(rng, batch, regime, top=25.0):
  """log10(||g_i|| / C) per example: all inside the clip ball, all outside, both,
  within 1e-6 relative of the ball's surface, or anywhere in [-30, top]."""
  if regime == "inside":
    return rng.uniform(-5, -0.01, batch)
  if regime == "outside":
    return rng.uniform(0.01, 5, batch)
  if regime == "mixed":
    return rng.uniform(-3, 3, batch)
  if regime == "boundary":
    return rng.uniform(-4.4e-7, 4.4e-7, batch)     # |log10(1 + 1e-6)| = 4.3e-7
  return rng.uniform(-30, top, batch)


def _flat64(tree, batch):
  """(batch, n) float64 matrix of the per-example leaves, in tree-flatten order."""
  return np.concatenate([np.asarray(x).astype(np.float64).reshape(batch, -1)
                         for x in jax.tree.leaves(tree)], axis=1)


def _split_like(flat, tree):
  """Splits per-coordinate vectors (n,) back into the leaves' shapes (no batch axis)."""
  out, start = [], 0
  for x in jax.tree.leaves(tree):
    size = int(np.prod(x.shape[1:], dtype=np.int64))
    out.append(flat[start:start + size].reshape(x.shape[1:]))
    start += size
  return out


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _no_noise(clip, **kw):
  with pytest.warns(UserWarning, match="NOT differentially private"):
    return optax_dp.dp_aggregate(clip, 0.0, jax.random.key(0), **kw)


# ----------------------------------------------------------------------------------
# Error bounds.


def _gamma(k, u=U32):
  return k * u / (1 - k * u)


def _rounding(dtype):
  """(unit roundoff, smallest subnormal) of the cast to `dtype`; 0 for no cast."""
  dtype = np.dtype(dtype)
  if jnp.promote_types(dtype, jnp.float32) != dtype:   # narrower than float32
    info = jnp.finfo(dtype)
    return float(info.eps) / 2, float(info.smallest_subnormal)
  return 0.0, 0.0


def _norm_bound(n, clip):
  """hi such that a clipped example's norm, computed from its float32 values, is <= clip * hi.

  The library computes s = fl(sum of n squares) = S(1 + t) with |t| <= gamma_n
  (+ n * SUB32 / S for underflowing squares, S >= C^2 when clipping happens),
  norm = fl(sqrt(s)), factor = fl(C32 / norm) with C32 = C(1 + d), and each
  coordinate fl(factor * g_j). So ||clip(g)|| <= C (1+u)^3 / ((1-u) sqrt(1 - t)).
  An unclipped example (factor 1) satisfies the same bound: factor 1 means
  C32 / norm >= 1. The float64 norm of the result adds (n + 2) u64.
  """
  t = _gamma(n) + n * SUB32 / clip ** 2
  return (1 + U32) ** 3 / ((1 - U32) * math.sqrt(1 - t)) * (1 + (n + 2) * U64)


def _factor_rel_err(sq64, n, clip):
  """Bound on |factor_computed / factor_exact - 1| per example (see _norm_bound).

  0 where the factor is exactly 1 in both: ||g||^2 <= C^2/4 gives
  s <= C^2/4 (1 + gamma_n) + n SUB32 < C32^2, so fl(C32 / norm) > 1.
  """
  out = np.zeros_like(sq64)
  for i, s in enumerate(sq64):
    if np.isfinite(s) and s > clip ** 2 / 4:
      t = _gamma(n) + n * SUB32 / s
      out[i] = max((1 + U32) ** 2 / ((1 - U32) * math.sqrt(1 - t)) - 1,
                   1 - (1 - U32) ** 2 / ((1 + U32) * math.sqrt(1 + t)))
  return out


def _reference(G, clip, normaliser=None, out_dtype=jnp.float32, keep=None):
  """Exact clipped sum (float64) and a per-coordinate bound on the library's error.

  G: (B, n) float64 per-example gradients; a non-finite row contributes 0, as
  the contract says. With factors f_i (exact) and f^_i = f_i (1 + e_i), the
  library's float32 `tensordot` is sum_i f^_i g_ij (1 + d_ij) with
  |d_ij| <= gamma_B (B products and B - 1 additions in any order), plus one
  SUB32 per product for underflow; then / fl32(normaliser) (2 roundings) and
  the cast to the output dtype (u_d, smallest subnormal sd). A = sum_i f_i |g_ij|:

    |lib - ref| <= [(e + gamma_B (1 + e)) A + B SUB32] / N (1 + eta)
                   + eta |ref| + SUB32, then * (1 + u_d) + u_d |ref| + sd,

  with eta = (1 + u)/(1 - u) - 1 (0 without a normaliser), plus the float64
  reference's own rounding, 8 (B + n) u64 A / N.
  """
  B, n = G.shape
  finite = np.all(np.isfinite(G), axis=1)
  if keep is not None:
    finite &= keep
  G = np.where(finite[:, None], G, 0.0)
  sq = np.sum(G * G, axis=1)
  f = np.where(finite, np.minimum(1.0, clip / np.maximum(np.sqrt(sq), 1e-300)), 0.0)
  e = float(np.max(_factor_rel_err(sq, n, clip), initial=0.0))
  N = 1.0 if normaliser is None else float(normaliser)
  eta = 0.0 if normaliser is None else (1 + U32) / (1 - U32) - 1
  A = np.abs(G).T @ f
  ref = (G.T @ f) / N
  err32 = ((e + _gamma(B) * (1 + e)) * A + B * SUB32) / N * (1 + eta) + eta * np.abs(ref) + SUB32
  ud, sd = _rounding(out_dtype)
  err = err32 * (1 + ud) + ud * np.abs(ref) + sd + 8 * (B + n) * U64 * A / N
  return ref, err, f


def _assert_within(got_tree, refs, errs, like=None):
  """|got - ref| <= err per coordinate; refs/errs: flat vectors split like `like`, or lists."""
  if like is not None:
    refs, errs = _split_like(refs, like), _split_like(errs, like)
  leaves = jax.tree.leaves(got_tree)
  assert len(leaves) == len(refs) == len(errs)
  for got, ref, err in zip(leaves, refs, errs):
    got = np.asarray(got).astype(np.float64)
    assert got.shape == ref.shape
    bad = ~(np.abs(got - ref) <= err)
    assert not np.any(bad), (got[bad][:5], ref[bad][:5], err[bad][:5])


# ----------------------------------------------------------------------------------
# 1. Every clipped contribution has global norm <= C.

log_clips = st.floats(-4, 4)


@_settings(40)
@given(log_clip=log_clips,
       count=st.integers(1, 24), regime=st.sampled_from(REGIMES),
       seed=st.integers(0, 2 ** 32 - 1),
       specials=st.lists(st.sampled_from([0.0, np.inf, np.nan, "sub"]), max_size=3),
       mask=st.lists(st.booleans(), min_size=27, max_size=27))
def test_clip_factors_bound_each_contribution(log_clip, count, regime, seed, specials, mask):
  """The internal factors, from float32 squared norms s (||g|| = sqrt(s) exactly):
  norm = fl(sqrt(s)), f = min(1, fl(C32 / norm)), so f ||g|| is within C [lo, hi],
  lo = (1-u)^2/(1+u), hi = (1+u)^2/(1-u) when clipping; hence 0 <= f <= 1, f ||g|| <= C hi,
  f = 1 exactly below C lo, f ||g|| >= C lo above C hi; f = 0 exactly for non-finite
  (or, in _clipping.clip_rows, masked) examples. 4 u64 covers the float64 check itself."""
  clip = 10.0 ** log_clip
  log_norms = np.clip(log_clip + _log_offsets(np.random.default_rng(seed), count, regime),
                      -25, 19)
  sq = [10.0 ** (2 * k) for k in log_norms]        # up to 1e38, below float32's max
  sq += [SUB32 * 3 if s == "sub" else s for s in specials]
  sq = np.asarray(sq, np.float32)
  mask = np.asarray(mask[:len(sq)])
  f = np.asarray(_clipping.clip_factors(jnp.asarray(sq), clip), np.float64)
  finite = np.isfinite(sq)
  norm = np.sqrt(sq.astype(np.float64))
  hi = (1 + U32) ** 2 / (1 - U32) * (1 + 4 * U64)
  lo = (1 - U32) ** 2 / (1 + U32) * (1 - 4 * U64)
  assert np.all((f >= 0) & (f <= 1))
  assert np.all(f[~finite] == 0)
  assert np.all(f[finite] * norm[finite] <= clip * hi)
  assert np.all(f[finite & (norm <= clip * lo)] == 1)
  assert np.all(f[finite & (norm >= clip * hi)] * norm[finite & (norm >= clip * hi)]
                >= clip * lo)
  # The masked variant clipped_grads uses (clip_rows, one group).
  rows = _clipping.clip_rows([jnp.asarray(sq)], (0,), (clip,), jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(rows.keep), finite & mask)
  np.testing.assert_array_equal(np.asarray(rows.factors[0]),
                                np.where(finite & mask, f, 0.0))
  assert int(rows.nonfinite_examples) == int(np.sum(~finite & mask))


@pytest.mark.slow   # fast tier: test_aggregate's test_each_clipped_contribution_has_norm_at_most_clip
@_settings(25)
@given(spec=_specs(), log_clip=log_clips, seed=st.integers(0, 2 ** 32 - 1),
       batch=st.integers(1, 4), regime=st.sampled_from(REGIMES),
       bad=st.lists(st.sampled_from([None, None, None, "nan", "inf"]), max_size=4))
def test_clipped_contribution_norm_at_most_clip(spec, log_clip, seed, batch, regime, bad):
  """Each example alone through clip_and_sum and dp_aggregate (batch 1, E = 1, no noise), and
  all together through the internal factors: ||clip(g_i)|| <= C * _norm_bound(n); an example
  below C (1-u)^3/((1+u) sqrt(1+t)) is returned bitwise unchanged, one above C * hi has
  norm >= C * lo and keeps its direction; a non-finite one contributes exactly 0."""
  clip = 10.0 ** log_clip
  n = _size(spec)
  rng = np.random.default_rng(seed)
  offsets = _log_offsets(rng, batch, regime, top=25.0)
  grads = _per_example_tree(spec, log_clip + offsets, rng,
                            (bad + [None] * batch)[:batch])
  G = _flat64(grads, batch)
  hi = _norm_bound(n, clip)
  t = _gamma(n) + n * SUB32 / clip ** 2
  lo = (1 - U32) ** 3 / ((1 + U32) * math.sqrt(1 + t)) * (1 - (n + 2) * U64)
  # All examples at once, through the internal factors.
  f = np.asarray(_clipping.clip_factors(_clipping.per_example_sq_norms(grads), clip),
                 np.float64)
  finite_rows = np.all(np.isfinite(G), axis=1)
  norms = np.linalg.norm(np.where(finite_rows[:, None], G, 0.0), axis=1)
  assert np.all(f[finite_rows] * norms[finite_rows] <= clip * hi)
  assert np.all((f >= 0) & (f <= 1))
  assert np.all(f[~finite_rows] == 0)
  # A finite example whose squared norm overflows float32 is dropped (its factor is 0,
  # documented in DPAggregateState); computed s >= S (1 - gamma_n), so a squared norm
  # below F32MAX / 2 certainly does not overflow; above it, either outcome is allowed.
  may_drop = ~finite_rows | (norms ** 2 >= F32MAX / 2)
  tx = _no_noise(clip, expected_batch_size=1)
  for i in range(batch):
    example = jax.tree.map(lambda x: x[i:i + 1], grads)
    clipped = optax_dp.clip_and_sum(example, clip)
    out = _flat64(jax.tree.map(lambda x: x[None], clipped.clipped_sum), 1)[0]
    norm = np.linalg.norm(out)
    assert norm <= clip * hi, (norm, clip)
    dropped = int(clipped.nonfinite_examples) == 1
    assert int(clipped.nonfinite_examples) in (0, 1)
    if not finite_rows[i]:
      assert dropped
    elif not may_drop[i]:
      assert not dropped
    if dropped:
      assert np.all(out == 0)
    elif norms[i] <= clip * lo:
      assert np.array_equal(out, G[i])           # within the ball: the identity
    elif norms[i] >= clip * hi:
      assert norm >= clip * lo - math.sqrt(n) * SUB32
      # Parallel to g: out_j = f g_j (1 + d_j); with f^ = ||out|| / ||g|| = f (1 + d'),
      # |out_j - f^ g_j| <= 2u/(1-u) f^ |g_j| (+ one subnormal, + float64 rounding).
      fhat = norm / norms[i]
      assert np.all(np.abs(out - fhat * G[i])
                    <= (2 * U32 / (1 - U32) + 4 * n * U64) * fhat * np.abs(G[i]) + SUB32)
    # Through dp_aggregate: the same, then cast to each leaf's dtype
    # (|cast - x| <= u_d |x| + sd per coordinate).
    agg, _ = tx.update(example, tx.init(None))
    agg = _flat64(jax.tree.map(lambda x: x[None], agg), 1)[0]
    ud = max(_rounding(l.dtype)[0] for l in _leaves(spec))
    sd = max(_rounding(l.dtype)[1] for l in _leaves(spec))
    assert np.linalg.norm(agg) <= clip * hi * (1 + ud) + math.sqrt(n) * sd


# ----------------------------------------------------------------------------------
# 2. With noise 0, dp_aggregate is the float64 clipped sum / expected_batch_size.


@pytest.mark.slow   # fast tier: test_aggregate's clipped-mean and normaliser tests
@_settings(30)
@given(data=st.data(), spec=_specs(), log_clip=log_clips, seed=st.integers(0, 2 ** 32 - 1),
       batch=st.integers(1, 8), expected=st.one_of(st.none(), st.integers(1, 64)),
       with_params=st.booleans())
def test_zero_noise_output_is_the_clipped_mean(data, spec, log_clip, seed, batch, expected,
                                               with_params):
  """dp_aggregate(C, 0, expected_batch_size=E) == sum_i clip_C(g_i) / E (E defaults to B),
  each coordinate within the bound of _reference; non-finite examples contribute 0."""
  clip = 10.0 ** log_clip
  rng = np.random.default_rng(seed)
  # Norms up to 1e17: squared norms stay far below float32's overflow.
  offsets = _log_offsets(rng, batch, data.draw(st.sampled_from(REGIMES), "regime"),
                         top=17 - log_clip)
  bad = data.draw(st.lists(st.sampled_from([None] * 5 + ["nan", "-inf"]),
                           min_size=batch, max_size=batch), "bad")
  grads = _per_example_tree(spec, log_clip + offsets, rng, bad)
  G = _flat64(grads, batch)
  out_dtypes = [x.dtype for x in jax.tree.leaves(grads)]
  normaliser = expected or batch
  ref = _split_like(_reference(G, clip, normaliser)[0], grads)
  # Each leaf's bound with the cast to its own dtype.
  err = [_split_like(_reference(G, clip, normaliser, out_dtype=d)[1], grads)[k]
         for k, d in enumerate(out_dtypes)]
  for d, r, e in zip(out_dtypes, ref, err):
    assume(np.all(np.abs(r) + e < float(jnp.finfo(d).max)))   # representable output
  tx = _no_noise(clip, expected_batch_size=expected)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), grads) if with_params else None
  out, state = tx.update(grads, tx.init(params), params)
  assert [x.dtype for x in jax.tree.leaves(out)] == out_dtypes
  _assert_within(out, ref, err)
  assert int(state.nonfinite_examples) == int(np.sum(~np.all(np.isfinite(G), axis=1)))
  assert int(state.step) == 1


# ----------------------------------------------------------------------------------
# 3. A padding example's data never matters.

def _micro_ok(micro, spec):
  """microbatch_size for clipped_grads (every dtype; bfloat16/float16 leaves
  once raised here, see test_microbatched_clipped_grads_with_narrow_params)."""
  del spec
  return micro


JUNK = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": 3e38, "tiny": 1e-45,
        "zero": 0.0}


def _tanh_loss(params, batch):
  """An ordinary batched mean loss over any params tree (batch: the same tree with a
  leading batch axis)."""
  terms = [jnp.sum(jnp.tanh(p[None].astype(jnp.float32) * x.astype(jnp.float32) + 0.3),
                   axis=tuple(range(1, x.ndim)))
           for p, x in zip(jax.tree.leaves(params), jax.tree.leaves(batch))]
  return jnp.mean(sum(terms[1:], terms[0]) ** 2)


def _with_junk(batch_tree, mask, junk, rng):
  """Masked rows replaced by `junk` (one kind per row; "random": fresh data of the real
  rows' scale, whose gradients are finite and non-zero, so a leak would change the sum)."""
  def fill(x):
    x = np.array(x).astype(np.float64)
    for i, (m, kind) in enumerate(zip(mask, junk)):
      if not m:
        x[i] = (2 * rng.standard_normal(x.shape[1:]) if kind == "random"
                else JUNK[kind])
    return x
  return jax.tree.map(lambda x: _cast(fill(x), x.dtype), batch_tree)


@pytest.mark.filterwarnings("ignore:.*same noise key")   # examples may draw the same seed
@_settings(8)
@given(data=st.data(), spec=_specs(dtypes=st.sampled_from(NARROW)),
       seed=st.integers(0, 2 ** 32 - 1), batch=st.integers(1, 6),
       log_clip=log_clips, method=st.sampled_from(["vmap", "auto"]))
def test_masked_rows_never_matter(data, spec, seed, batch, log_clip, method):
  """per_example_grads(loss)(params, batch, mask) has exact zeros in masked rows whatever
  their data, and the rest of the pipeline (its dp_aggregate output and state, and
  clipped_grads + dp_aggregate, with noise) is bitwise the same when only masked rows change."""
  mask = np.asarray(data.draw(st.lists(st.booleans(), min_size=batch, max_size=batch), "mask"))
  junk = data.draw(st.lists(st.sampled_from(list(JUNK) + ["random"]), min_size=batch,
                            max_size=batch), "junk")
  micro = data.draw(st.one_of(st.none(), st.integers(1, batch)), "microbatch_size")
  expected = data.draw(st.one_of(st.none(), st.integers(1, 16)), "expected")
  clip = 10.0 ** log_clip
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda l: _cast(rng.standard_normal(l.shape), l.dtype), spec)
  real = jax.tree.map(lambda l: _cast(rng.standard_normal((batch,) + l.shape), l.dtype), spec)
  junked = _with_junk(real, mask, junk, rng)
  zeroed = _with_junk(real, mask, ["zero"] * batch, rng)
  tx = optax_dp.dp_aggregate(clip, 1.3, jax.random.key(seed % 2 ** 31),
                             expected_batch_size=expected)
  peg = optax_dp.per_example_grads(_tanh_loss, microbatch_size=micro)
  cg = optax_dp.clipped_grads(_tanh_loss, clip, method=method,
                              microbatch_size=_micro_ok(micro, spec))

  @jax.jit   # one compile for both batches (the shapes vary between examples)
  def run(x, mask):
    grads = peg(params, x, mask)
    agg = tx.update(grads, tx.init(params), params)
    clipped = cg(params, x, mask)
    fast = tx.update(clipped, tx.init(params), params)
    return grads, agg, clipped, fast

  a, b = run(junked, mask), run(zeroed, mask)
  for leaf in jax.tree.leaves(a[0]):
    assert np.all(np.asarray(leaf)[~mask] == 0)
  _assert_bitwise(a, b)


class _MLP:
  """A small flax.linen model and its jitted pipeline, compiled once for all examples."""
  batch, dim = 5, 4
  _fn = None

  @classmethod
  def fn(cls):
    if cls._fn is None:
      import models

      model = models.MLP((3, 2), jnp.tanh)
      params = model.init(jax.random.key(0), jnp.zeros((1, cls.dim)))["params"]

      def loss_fn(p, b):
        x, y = b
        return jnp.mean(jnp.sum(jnp.square(model.apply({"params": p}, x) - y), -1))

      tx = optax_dp.dp_aggregate(0.05, 1.0, jax.random.key(1), expected_batch_size=4)

      @jax.jit
      def pipeline(x, y, mask):
        out = {}
        grads = optax_dp.per_example_grads(loss_fn)(params, (x, y), mask)
        out["per_example"] = (grads, tx.update(grads, tx.init(params), params))
        for method in ("vmap", "auto"):
          clipped = optax_dp.clipped_grads(loss_fn, 0.05, method=method)(params, (x, y), mask)
          out[method] = (clipped, tx.update(clipped, tx.init(params), params))
        return out

      cls._fn = pipeline
    return cls._fn


@_settings(8)
@given(mask=st.lists(st.booleans(), min_size=_MLP.batch, max_size=_MLP.batch),
       junk=st.lists(st.sampled_from(list(JUNK) + ["random"]), min_size=_MLP.batch,
                     max_size=_MLP.batch),
       seed=st.integers(0, 2 ** 32 - 1))
def test_masked_rows_never_matter_flax(mask, junk, seed):
  """The same on a flax.linen Dense model, for per_example_grads and clipped_grads
  (method "vmap" and "auto", i.e. book-keeping), all under jit: bitwise equal outputs."""
  rng = np.random.default_rng(seed)
  mask = np.asarray(mask)
  real = (jnp.asarray(rng.standard_normal((_MLP.batch, _MLP.dim)), jnp.float32),
          jnp.asarray(rng.standard_normal((_MLP.batch, 2)), jnp.float32))
  junked = _with_junk(real, mask, junk, rng)
  zeroed = _with_junk(real, mask, ["zero"] * _MLP.batch, rng)
  a = _MLP.fn()(*junked, mask)
  b = _MLP.fn()(*zeroed, mask)
  for leaf in jax.tree.leaves(a["per_example"][0]):
    assert np.all(np.asarray(leaf)[~mask] == 0)
  _assert_bitwise(a, b)


# ----------------------------------------------------------------------------------
# 4. The clipped sum is linear in the mask.


def _linear_loss(params, batch):
  """mean_b <params, x_b>: each example's gradient is exactly its data row x_b."""
  terms = [jnp.sum((p[None] * x).astype(jnp.float32), axis=tuple(range(1, x.ndim)))
           for p, x in zip(jax.tree.leaves(params), jax.tree.leaves(batch))]
  return jnp.mean(sum(terms[1:], terms[0]))


@_settings(12)
@given(data=st.data(), spec=_specs(), seed=st.integers(0, 2 ** 32 - 1),
       batch=st.integers(1, 8), log_clip=log_clips,
       method=st.sampled_from(["vmap", "auto"]))
def test_clipped_sum_is_linear_in_the_mask(data, spec, seed, batch, log_clip, method):
  """For disjoint masks m1, m2: clipped_grads(m1 | m2) == clipped_grads(m1) + clipped_grads(m2)
  (and the non-finite counts add), and clipped_grads(m) == sum_{i in m} clip_C(g_i) in float64,
  within _reference's bound (regime "inside": clipping is the identity, the factors exactly 1)."""
  clip = 10.0 ** log_clip
  which = np.asarray(data.draw(st.lists(st.integers(0, 2), min_size=batch, max_size=batch),
                               "membership"))          # 0: padding, 1: in m1, 2: in m2
  regime = data.draw(st.sampled_from(REGIMES[:4]), "regime")
  bad = data.draw(st.lists(st.sampled_from([None] * 4 + ["nan", "inf"]), min_size=batch,
                           max_size=batch), "bad")
  micro = data.draw(st.one_of(st.none(), st.integers(1, batch)), "microbatch_size")
  rng = np.random.default_rng(seed)
  x = _per_example_tree(spec, log_clip + _log_offsets(rng, batch, regime), rng, bad)
  params = jax.tree.map(lambda l: _cast(rng.standard_normal(l.shape), l.dtype), spec)
  G = _flat64(x, batch)
  # The premise: per-example gradients of _linear_loss are the data rows, bitwise.
  grads = optax_dp.per_example_grads(_linear_loss)(params, x)
  finite_rows = np.all(np.isfinite(G), axis=1)
  assert _flat64(grads, batch)[finite_rows].tobytes() == G[finite_rows].tobytes()
  fn = jax.jit(optax_dp.clipped_grads(_linear_loss, clip, method=method,
                                       microbatch_size=_micro_ok(micro, spec)))
  got, errs, refs = {}, {}, {}
  for name, m in (("m1", which == 1), ("m2", which == 2), ("both", which > 0)):
    c = fn(params, x, m)
    got[name] = (_flat64(jax.tree.map(lambda s: s[None], c.clipped_sum), 1)[0],
                 int(c.nonfinite_examples))
    refs[name], errs[name], _ = _reference(G, clip, keep=m)
    _assert_within(c.clipped_sum, refs[name], errs[name], x)
    assert int(c.nonfinite_examples) == int(np.sum(m & ~finite_rows))
  # Linearity (the sum of the two float32 results taken in float64, exactly enough):
  total = got["m1"][0] + got["m2"][0]
  assert np.all(np.abs(got["both"][0] - total)
                <= errs["both"] + errs["m1"] + errs["m2"] + 2 * U64 * np.abs(total))
  assert got["both"][1] == got["m1"][1] + got["m2"][1]


# ----------------------------------------------------------------------------------
# 5. The noise: N(0, (sigma C / E)^2) per coordinate, independent across leaves and steps.

MIN_COORDS = 20_000


@st.composite
def _noise_cases(draw):
  clip = 10.0 ** draw(st.floats(-3, 3), "log_clip")
  sigma = 10.0 ** draw(st.floats(-1.3, 1.3), "log_sigma")
  batch = draw(st.integers(1, 3), "batch")
  expected = draw(st.one_of(st.none(), st.integers(1, 1000)), "expected")
  rescale = draw(st.booleans(), "rescale_to_unit_norm")
  std = sigma * clip / (expected or batch) / (clip if rescale else 1.0)
  # float16 only where its normal range holds the noise (|x| up to ~8 std).
  allowed = [d for d in DTYPES if d != jnp.float16 or 1e-3 <= std <= 1e3]
  spec = draw(_specs(dtypes=st.sampled_from(allowed), max_dim=40, max_leaves=4), "spec")
  leaves, treedef = jax.tree.flatten(spec)
  n = _size(spec)
  if n < MIN_COORDS:     # stretch one leaf so that every example has >= MIN_COORDS coordinates
    j = draw(st.integers(0, len(leaves) - 1), "stretched_leaf")
    reps = -(-(MIN_COORDS - n + leaves[j].size) // leaves[j].size)
    leaves[j] = _Leaf((reps,) + leaves[j].shape, leaves[j].dtype)
    spec = jax.tree.unflatten(treedef, leaves)
  if draw(st.booleans(), "twin"):   # a leaf of the same shape as the largest: shared keys show
    big = max(leaves, key=lambda l: l.size)
    spec = [spec, _Leaf(big.shape, draw(st.sampled_from(allowed), "twin_dtype"))]
  seed = draw(st.integers(0, 2 ** 31 - 1), "key")
  return clip, sigma, batch, expected, rescale, std, spec, seed


def _beta_corr_threshold(m, alpha):
  """|r| threshold: r = x.y / (|x||y|) with y ~ N(0, s^2 I_m) independent of x has
  r^2 ~ Beta(1/2, (m-1)/2) exactly (y's direction is uniform on the sphere)."""
  return math.sqrt(stats.beta.isf(alpha, 0.5, (m - 1) / 2))


def _corr_lower_bound(x, bx, y, by):
  """Lower bound on |r| of the unrounded vectors given the rounded ones and per-coordinate
  error bounds: |x.y - x^.y^| <= sum(bx|y^| + by|x^| + bx by), |x| <= |x^| + |bx|."""
  dot = abs(float(np.dot(x, y)))
  e = float(np.sum(bx * np.abs(y) + by * np.abs(x) + bx * by))
  return max(0.0, dot - e) / ((np.linalg.norm(x) + np.linalg.norm(bx))
                              * (np.linalg.norm(y) + np.linalg.norm(by)))


@pytest.mark.filterwarnings("ignore:.*same noise key")   # examples may draw the same seed
@_settings(7)
@given(case=_noise_cases())
def test_noise_matches_the_contract(case):
  """Zero gradients, two steps. Pooled over all N >= 20000 coordinates of a step, with
  s = sigma C / E (/ C with rescale_to_unit_norm): sum x^2 / s^2 ~ chi2_N and sum x ~
  N(0, N s^2) (two-sided), step 1 vs step 2 and every pair of leaves of step 1 have
  r^2 ~ Beta(1/2, (m-1)/2). Each test has level FALSE_ALARM / (number of tests).

  Rounding: x^ = fl_d(fl(fl(fl32(sigma C) z) / fl32(E)) (zero sum: + 0 is exact) so
  |x^ - x| <= delta |x| + sd, delta = (1+u)^3/(1-u) (1+u_d) - 1 (sd: the output dtype's
  smallest subnormal). The generator's float32 normals z = sqrt(2) erfinv(u), u on a
  2^-22-spaced grid of (-1, 1), differ from N(0, 1) by the truncation at |z| ~ 5.3 (tail
  variance ~3.5e-6), the grid's 2^-23 mean offset and float32 erfinv rounding (~1e-6):
  variance within 1e-5 of 1 and mean within 1e-5 of 0; we allow g = 1e-4 in both. The
  Beta law of r is exact for Gaussian y; these deviations are far below its resolution.
  """
  clip, sigma, batch, expected, rescale, std, spec, seed = case
  leaves_spec, treedef = jax.tree.flatten(spec)
  grads = jax.tree.unflatten(
      treedef, [jnp.zeros((batch,) + l.shape, l.dtype) for l in leaves_spec])
  tx = optax_dp.dp_aggregate(clip, sigma, jax.random.key(seed), expected_batch_size=expected,
                             rescale_to_unit_norm=rescale)
  state = tx.init(None)
  steps = []
  for _ in range(2):
    out, state = tx.update(grads, state)
    assert [x.dtype for x in jax.tree.leaves(out)] == [l.dtype for l in leaves_spec]
    steps.append([np.asarray(x).astype(np.float64).ravel() for x in jax.tree.leaves(out)])
  L = len(leaves_spec)
  pairs = [(a, b) for a in range(L) for b in range(a + 1, L)
           if min(leaves_spec[a].size, leaves_spec[b].size) >= 2]
  alpha = FALSE_ALARM / (5 + len(pairs))
  g = 1e-4

  def errors(leaves):
    out = []
    for x, l in zip(leaves, leaves_spec):
      ud, sd = _rounding(l.dtype)
      delta = (1 + U32) ** 3 / (1 - U32) * (1 + ud) - 1
      out.append(delta / (1 - delta) * np.abs(x) + sd + SUB32)
    return out

  for leaves in steps:
    x = np.concatenate(leaves)
    b = np.concatenate(errors(leaves))
    N = x.size
    assert N >= MIN_COORDS
    assert np.all(np.isfinite(x))
    # Variance: sum x^2 within the chi-square band, widened by the rounding (|x| -> |x| +- b).
    lo_sq = float(np.sum(np.maximum(np.abs(x) - b, 0.0) ** 2))
    hi_sq = float(np.sum((np.abs(x) + b) ** 2))
    assert hi_sq / std ** 2 >= stats.chi2.ppf(alpha / 2, N) * (1 - g), (hi_sq / N, std ** 2)
    assert lo_sq / std ** 2 <= stats.chi2.isf(alpha / 2, N) * (1 + g), (lo_sq / N, std ** 2)
    # Mean 0.
    z = stats.norm.isf(alpha / 2)
    assert abs(float(np.sum(x))) <= z * std * math.sqrt(N) * (1 + g) + float(np.sum(b)) + g * std * N
  # Fresh noise every step: pooled step 1 vs step 2.
  x1, x2 = np.concatenate(steps[0]), np.concatenate(steps[1])
  b1, b2 = np.concatenate(errors(steps[0])), np.concatenate(errors(steps[1]))
  assert _corr_lower_bound(x1, b1, x2, b2) <= _beta_corr_threshold(x1.size, alpha)
  # Independent noise per leaf: every pair of leaves (the longer one truncated).
  e1 = errors(steps[0])
  for a, c in pairs:
    m = min(steps[0][a].size, steps[0][c].size)
    r = _corr_lower_bound(steps[0][a][:m], e1[a][:m], steps[0][c][:m], e1[c][:m])
    assert r <= _beta_corr_threshold(m, alpha), (a, c, r)


# ----------------------------------------------------------------------------------
# 6. dp_accumulate over k chunks == dp_aggregate on the concatenated batch.


@pytest.mark.filterwarnings("ignore:.*same noise key")   # the same key on purpose
@pytest.mark.slow   # fast tier: test_accumulate's k-physical-batches cases
@_settings(10)
@given(data=st.data(), spec=_specs(), seed=st.integers(0, 2 ** 32 - 1), k=st.integers(1, 4),
       log_clip=log_clips, sigma=st.sampled_from([0.0, 0.7, 3.0]),
       expected=st.integers(1, 32))
def test_accumulation_equals_one_logical_batch(data, spec, seed, k, log_clip, sigma, expected):
  """Two logical steps, each split into k chunks of random sizes (0 allowed; an explicit
  expected_batch_size, which dp_accumulate requires, see test_accumulate.py): the k-1
  held updates are exactly zero, the released one equals dp_aggregate on the concatenated
  batch with the same key, within twice _reference's bound plus the rounding of adding the
  (identical) noise and of the cast: |o_a - o_r| <= 2 err_sum / N + (eta' + u_d)(|o_a| + |o_r|
  + 2 sd) / (1 - eta') / (1 - u_d) + 2 (SUB32 + sd), eta' = (1+u)^2/(1-u) - 1."""
  clip = 10.0 ** log_clip
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed % 2 ** 31)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)      # sigma = 0 warns (tested above)
    ref_tx = optax_dp.dp_aggregate(clip, sigma, key, expected_batch_size=expected)
    acc_tx = optax_dp.dp_accumulate(
        optax_dp.dp_aggregate(clip, sigma, key, expected_batch_size=expected), k)
  params = jax.tree.map(lambda l: jnp.zeros(l.shape, l.dtype), spec)
  ref_state, acc_state = ref_tx.init(params), acc_tx.init(params)
  for step in range(2):
    sizes = data.draw(st.lists(st.integers(0, 4), min_size=k, max_size=k),
                      f"chunk_sizes_{step}")
    sizes[-1] += sum(sizes) == 0          # a logical batch of at least one row
    total = sum(sizes)
    offsets = _log_offsets(rng, total, data.draw(st.sampled_from(REGIMES[:4]),
                                                 f"regime_{step}"))
    bad = data.draw(st.lists(st.sampled_from([None] * 5 + ["nan"]), min_size=total,
                             max_size=total), f"bad_{step}")
    grads = _per_example_tree(spec, log_clip + offsets, rng, bad)
    ref, ref_state = ref_tx.update(grads, ref_state, params)
    start = 0
    for j, size in enumerate(sizes):
      chunk = jax.tree.map(lambda x: x[start:start + size], grads)
      start += size
      out, acc_state = acc_tx.update(optax_dp.clip_and_sum(chunk, clip), acc_state, params)
      if j < k - 1:
        for leaf in jax.tree.leaves(out):
          assert not np.any(np.asarray(leaf))
    G = _flat64(grads, total)
    _, err_sum, _ = _reference(G, clip)                 # bound on each float32 sum
    assert [x.dtype for x in jax.tree.leaves(out)] == [x.dtype for x in jax.tree.leaves(ref)]
    eta = (1 + U32) ** 2 / (1 - U32) - 1
    for o_a, o_r, e in zip(jax.tree.leaves(out), jax.tree.leaves(ref),
                           _split_like(err_sum, grads)):
      ud, sd = _rounding(o_r.dtype)
      o_a, o_r = np.asarray(o_a).astype(np.float64), np.asarray(o_r).astype(np.float64)
      tol = (2 * e / (expected or total) + (eta + ud) * (np.abs(o_a) + np.abs(o_r) + 2 * sd)
             / ((1 - eta) * (1 - ud)) + 2 * (SUB32 + sd))
      assert np.all(np.abs(o_a - o_r) <= tol), np.max(np.abs(o_a - o_r) - tol)
    inner = acc_state.inner_state
    assert int(inner.step) == int(ref_state.step) == step + 1
    assert int(inner.nonfinite_examples) == int(ref_state.nonfinite_examples)
    assert int(acc_state.micro_step) == 0
    _assert_bitwise(inner.noise_key, ref_state.noise_key)


# ----------------------------------------------------------------------------------
# float64 leaves (JAX's x64 mode, enabled only inside this test).


@_settings(4)
@given(spec=_specs(dtypes=st.sampled_from([jnp.float64, jnp.float32])), log_clip=log_clips,
       seed=st.integers(0, 2 ** 32 - 1),
       batch=st.integers(1, 5), regime=st.sampled_from(REGIMES),
       expected=st.one_of(st.none(), st.integers(1, 16)))
def test_float64_leaves_under_x64(spec, log_clip, seed, batch, regime, expected):
  """Properties 1 and 2 with float64 leaves: float64 leaves are clipped and summed in
  float64 with float32 norms and factors, so the float32 bounds hold."""
  clip = 10.0 ** log_clip
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    grads = _per_example_tree(spec, log_clip + _log_offsets(rng, batch, regime, top=17),
                              rng)
    assert all(x.dtype == l.dtype for x, l in zip(jax.tree.leaves(grads), _leaves(spec)))
    G = _flat64(grads, batch)
    tx = _no_noise(clip, expected_batch_size=expected)
    out, _ = tx.update(grads, tx.init(None))
    assert [x.dtype for x in jax.tree.leaves(out)] == [l.dtype for l in _leaves(spec)]
    ref, err, _ = _reference(G, clip, expected or batch)
    _assert_within(out, ref, err, grads)
    for i in range(batch):
      c = optax_dp.clip_and_sum(jax.tree.map(lambda x: x[i:i + 1], grads), clip)
      norm = np.linalg.norm(_flat64(jax.tree.map(lambda s: s[None], c.clipped_sum), 1))
      assert norm <= clip * _norm_bound(_size(spec), clip)


def test_microbatched_clipped_grads_with_narrow_params():
  # Regression: the microbatched path's scan carry was bfloat16 (zeros_like
  # params) while each chunk's clipped sum is float32, and lax.scan raised.
  params = {"w": jnp.ones((3,), jnp.bfloat16)}
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.bfloat16)
  whole = optax_dp.clipped_grads(_linear_loss, 1.0)(params, x)
  chunked = optax_dp.clipped_grads(_linear_loss, 1.0, microbatch_size=2)(params, x)
  ref, err, _ = _reference(_flat64(x, 4), 1.0)
  _assert_within(whole.clipped_sum, ref, err, x)
  _assert_within(chunked.clipped_sum, ref, err, x)
