"""dp_aggregate, bit for bit, against the outputs recorded before its refactor.

`tests/golden/dp_aggregate.npz` holds, for every combination of

  clip    {fixed, groups, adaptive}
  noise   {none (sigma 0), i.i.d. Gaussian, DP-BandMF}
  input   {raw per-example gradients, a ClippedGrads from clipped_grads}
  ledger  {no budget, a budget}

(and rescale_to_unit_norm for each clip with i.i.d. noise), the bits of the
three updates of a 3-step run and of every `DPAggregateState` field after
each step. The file was written by `python tests/test_aggregate_golden.py`
at commit 0128b74 (before dp_aggregate became a composition of parts); any
change to the noise, the key use, the clip, the normaliser, the ledger or the
state layout changes some bit and fails here. A combination dp_aggregate
refuses (adaptive clipping with BandMF; sigma 0 has no budget) is recorded as
refused and must stay refused.

Rewrite the file only for a deliberate change of the mechanism's output, and
say so in the commit.

The bits are those of XLA's default compiler settings, which the recording
used; the other tests compile with cheaper ones (tests/conftest.py), which
may round differently. So the cases run in one fresh process with XLA's
defaults (`python tests/test_aggregate_golden.py --compute OUT.npz`), and
the tests compare what it computed with the recording.
"""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_dp

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "dp_aggregate.npz")
STEPS = 3
BATCH = 5
EXPECTED_BATCH_SIZE = 5
SIGMA = 1.1

CLIPS = ("fixed", "groups", "adaptive")
NOISES = ("none", "iid", "bandmf")
INPUTS = ("raw", "clipped")
LEDGERS = ("none", "budget")


def _clip(kind):
  if kind == "fixed":
    return 1.0
  if kind == "groups":
    return {"a": 0.5, "b": 0.7}
  return optax_dp.AdaptiveClip(initial_l2_norm_clip=1.0, learning_rate=0.5,
                               count_noise_stddev=2.0)


def _params():
  return {"a": jnp.asarray([0.1, -0.2, 0.3], jnp.float32),
          "b": {"k": jnp.asarray([[0.5, -0.1], [0.2, 0.4]], jnp.float32)}}


def _loss(params, batch):
  x, y = batch["x"], batch["y"]
  pred = x @ params["a"] + jnp.einsum("bi,ij,bj->b", y, params["b"]["k"], y)
  return jnp.mean((pred - 1.0) ** 2)


def _batch(step):
  rng = np.random.default_rng(100 + step)
  data = {"x": jnp.asarray(rng.normal(size=(BATCH, 3)) * (step + 1), jnp.float32),
          "y": jnp.asarray(rng.normal(size=(BATCH, 2)), jnp.float32)}
  mask = jnp.asarray([True] * (BATCH - 1) + [False])
  return optax_dp.MaskedBatch(data, mask)


def _raw(step):
  """Per-example gradients, norms around the clips; step 1 has a NaN row."""
  rng = np.random.default_rng(step)
  a = rng.normal(size=(BATCH, 3)) * (0.3 + step)
  k = rng.normal(size=(BATCH, 2, 2)) * 0.4
  if step == 1:
    a[2, 0] = np.nan
  a[-1] = 0.0   # a padding row
  k[-1] = 0.0
  return {"a": jnp.asarray(a, jnp.float32), "b": {"k": jnp.asarray(k, jnp.float32)}}


def _budget(noise):
  if noise == "bandmf":
    sampler = optax_dp.CyclicPoissonSampler(
        dataset_size=200, expected_batch_size=EXPECTED_BATCH_SIZE, bands=2)
  else:
    sampler = optax_dp.PoissonSampler(dataset_size=200,
                                      expected_batch_size=EXPECTED_BATCH_SIZE)
  return optax_dp.privacy_budget(sampler=sampler, target_delta=1e-5,
                                 noise_multiplier=SIGMA, steps=STEPS)


def _cases():
  for clip in CLIPS:
    for noise in NOISES:
      for inp in INPUTS:
        for ledger in LEDGERS:
          yield (clip, noise, inp, ledger, False)
    yield (clip, "iid", "raw", "none", True)


def _name(case):
  clip, noise, inp, ledger, rescale = case
  return f"{clip}-{noise}-{inp}-{ledger}" + ("-rescale" if rescale else "")


def _build(case):
  clip, noise, _, ledger, rescale = case
  kwargs = dict(key=7, rescale_to_unit_norm=rescale)
  if ledger == "budget":
    if noise == "none":
      return None   # a budget has a positive noise multiplier
    kwargs["budget"] = _budget(noise)
  else:
    kwargs["noise_multiplier"] = 0.0 if noise == "none" else SIGMA
    kwargs["expected_batch_size"] = EXPECTED_BATCH_SIZE
    if noise == "bandmf":
      kwargs["noise_strategy"] = optax_dp.bandmf_strategy(STEPS, 2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # sigma 0 warns that the run is not private
    return optax_dp.dp_aggregate(_clip(clip), **kwargs)


def _leaves(prefix, tree):
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
  return out


def run_case(case):
  """{array name: array} for the case's 3 steps, or {"refused": []}."""
  clip, _, inp, _, _ = case
  if clip == "adaptive" and case[1] == "bandmf":
    with pytest.raises(ValueError, match="adaptive clipping .* with DP-BandMF"):
      _build(case)
    return {"refused": np.zeros(0)}
  tx = _build(case)
  if tx is None:   # sigma 0 with a budget: nothing to build
    return {"refused": np.zeros(0)}
  params = _params()
  state = tx.init(params)
  out = _leaves("init/", state._asdict())
  for step in range(STEPS):
    if inp == "raw":
      grads = _raw(step)
    else:
      grad_fn = optax_dp.clipped_grads(_loss, _clip(clip))
      grads = (grad_fn(params, _batch(step),
                       l2_norm_clip=optax_dp.l2_norm_clip_of(state))
               if clip == "adaptive" else grad_fn(params, _batch(step)))
    updates, state = tx.update(grads, state, params)
    out.update(_leaves(f"step{step}/updates/", updates))
    out.update(_leaves(f"step{step}/state/", state._asdict()))
  return out


def _record(path=GOLDEN):
  arrays = {}
  for case in _cases():
    for k, v in run_case(case).items():
      arrays[f"{_name(case)}|{k}"] = v
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez_compressed(path, **arrays)
  return arrays


def _default_xla_environment():
  """This process's environment less the tests' compiler settings."""
  env = dict(os.environ)
  env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
  flags = [f for f in env.pop("XLA_FLAGS", "").split()
           if not f.startswith("--xla_cpu_use_fusion_emitters")]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  return env


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
  """Every case's arrays, computed in a fresh process with XLA's defaults."""
  out = tmp_path_factory.mktemp("golden") / "computed.npz"
  proc = subprocess.run([sys.executable, __file__, "--compute", str(out)],
                        capture_output=True, text=True, timeout=600,
                        env=_default_xla_environment(), check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with np.load(out) as f:
    return {k: f[k] for k in f.files}


def _golden():
  with np.load(GOLDEN) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize("case", list(_cases()), ids=_name)
def test_dp_aggregate_is_bit_for_bit_the_recorded_mechanism(case, computed):
  golden = _golden()
  prefix = _name(case) + "|"
  want = {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}
  assert want, f"no recording for {_name(case)}"
  got = {k[len(prefix):]: v for k, v in computed.items() if k.startswith(prefix)}
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype, k
    assert got[k].shape == v.shape, k
    assert np.array_equal(got[k], v, equal_nan=True), k


def test_the_recording_covers_every_combination_and_has_noise():
  golden = _golden()
  names = {k.split("|")[0] for k in golden}
  assert names == {_name(c) for c in _cases()}
  refused = {k.split("|")[0] for k in golden if k.endswith("|refused")}
  # Only adaptive+BandMF and sigma-0-with-a-budget are refused.
  assert refused == {_name(c) for c in _cases()
                     if (c[0] == "adaptive" and c[1] == "bandmf")
                     or (c[1] == "none" and c[3] == "budget")}
  # The recording is of a noisy mechanism: i.i.d. and BandMF updates differ
  # from sigma 0's, and BandMF's from i.i.d.'s (a recording of zeros, or of
  # one noise for all, could not fail on a noise change).
  for clip in ("fixed", "groups"):
    none = golden[f"{clip}-none-raw-none|step1/updates/['a']"]
    iid = golden[f"{clip}-iid-raw-none|step1/updates/['a']"]
    band = golden[f"{clip}-bandmf-raw-none|step1/updates/['a']"]
    assert not np.array_equal(none, iid) and not np.array_equal(iid, band)


if __name__ == "__main__":
  # `python tests/test_aggregate_golden.py` rewrites the recording;
  # `... --compute OUT.npz` writes the same arrays to OUT.npz (the tests).
  jax.config.update("jax_platforms", "cpu")
  target = sys.argv[2] if sys.argv[1:2] == ["--compute"] else GOLDEN
  written = _record(target)
  print(f"wrote {len(written)} arrays to {target}", file=sys.stderr)
