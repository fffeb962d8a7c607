"""JAX-side helpers shared by step_time.py, transformer_step.py,
recurrent_step.py and peak_memory.py.

The rows every JAX script has (`non_private`, `optax_dp_auto`,
`optax_dp_vmap`, and their Flax NNX twins) and the train step they share, the
`--check` pieces (per-example norms, the two clip norms, sigma = 0 steps, tree
differences, the auto-against-vmap check), the versions record and header
line, the clipping-plan summary, and the compile / warm-up / round-robin
timing of a set of rows. Only optax_dp's public API is used.

Needs JAX (the standard-library helpers are in _common.py, which
opacus_step.py also uses). Imported as `import _jax_common` by scripts in this
directory, which is then sys.path[0].
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import platform
import re
import time
import warnings
import zlib
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

import optax_dp

import _common

OPTAX_DP_ROWS = ("non_private", "optax_dp_auto", "optax_dp_vmap")
# DP-BandMF (optax_dp_auto's step with dp_aggregate(noise_strategy=...)), for
# the memory of its noise buffers: bands copies of the parameters. The
# strategy is built for BANDMF_STEPS steps (its size does not depend on them).
BANDMF_ROWS = ("optax_dp_bandmf2", "optax_dp_bandmf16")
BANDMF_STEPS = 1000
# The Flax NNX twins: nnx.Optimizer steps on an nnx.Module (its state split
# out, so that the row is a pure (state, opt_state, batch) step like the others).
NNX_ROWS = ("nnx_non_private", "nnx_optax_dp_auto", "nnx_optax_dp_vmap")

LossFn = Callable[[Any, Any], jax.Array]


class Row(NamedTuple):
  """One row: its optimizer's init and its (un-jitted) train step."""
  init: Callable[[Any], Any]                        # params -> opt_state
  step: Callable[[Any, Any, Any], tuple[Any, Any]]  # (params, opt_state, batch)


def row_key(name: str) -> jax.Array:
  """A noise key of each benchmark row's own: rows timed in one process would
  otherwise share a key (optax_dp warns, NoiseKeyReuseWarning). The values
  do not matter for a timing; the key must only be the row's."""
  return jax.random.key(zlib.crc32(name.encode()))


def sgd() -> optax.GradientTransformation:
  """The optimizer after the DP part, in every row: SGD with momentum."""
  return optax.sgd(_common.LEARNING_RATE, momentum=_common.MOMENTUM)


def make_row(tx: optax.GradientTransformation,
             grad_fn: Callable[[Any, Any], Any]) -> Row:
  """The train step `grads = grad_fn(params, batch)`, then `tx`, as a Row."""

  def step(params, opt_state, batch):
    grads = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return Row(tx.init, step)


def optax_dp_row(name: str, loss_fn: LossFn, batch_size: int,
                 noise_multiplier: float, l2_norm_clip: float) -> Row:
  """One of OPTAX_DP_ROWS for `loss_fn`, the ordinary batched mean loss.

  `non_private`: jax.grad + SGD. `optax_dp_auto`: `optax_dp.clipped_grads(
  loss_fn, C, method="auto")` (book-keeping; a ClippedGrads for dp_aggregate),
  `optax_dp_vmap`: `optax_dp.per_example_grads(loss_fn)`, both followed by
  chain(dp_aggregate(C, sigma, key, expected_batch_size=B), SGD).
  `optax_dp_bandmf{b}` (BANDMF_ROWS): optax_dp_auto's step with DP-BandMF
  noise of b bands.
  """
  if name == "non_private":
    return make_row(sgd(), jax.grad(loss_fn))
  if name not in OPTAX_DP_ROWS + BANDMF_ROWS:
    raise ValueError(f"unknown row {name!r}; choose from {OPTAX_DP_ROWS + BANDMF_ROWS}")
  strategy = (optax_dp.bandmf_strategy(BANDMF_STEPS, int(name[len("optax_dp_bandmf"):]))
              if name in BANDMF_ROWS else None)
  tx = optax.chain(
      optax_dp.dp_aggregate(l2_norm_clip, noise_multiplier, row_key(name),
                            expected_batch_size=batch_size, noise_strategy=strategy),
      sgd())
  if name == "optax_dp_vmap":
    return make_row(tx, optax_dp.per_example_grads(loss_fn))
  return make_row(tx, optax_dp.clipped_grads(loss_fn, l2_norm_clip,
                                             method="auto"))


def cross_entropy_loss(model) -> LossFn:
  """`loss_fn(params, (inputs, labels))`: mean softmax cross-entropy of `model`."""

  def loss_fn(params, batch):
    inputs, labels = batch
    logits = model.apply({"params": params}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss_fn


@contextlib.contextmanager
def quiet_sigma0() -> Iterator[None]:
  """Silences the noise_multiplier=0 warning (and peers' DeprecationWarnings)."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*noise_multiplier=0.*")
    warnings.simplefilter("ignore", DeprecationWarning)
    yield


def _float_leaves_with_path(tree) -> list[tuple[str, jax.Array]]:
  """(path, leaf) for the floating-point leaves (params; not an NNX model's
  RNG keys and counts)."""
  return [(jax.tree_util.keystr(k), x)
          for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


def leaf_diffs(a, b) -> dict[str, float]:
  """{path: max |a - b|} over the float leaves of two trees of one structure."""
  return {k: float(jnp.max(jnp.abs(x - y))) for (k, x), (_, y) in
          zip(_float_leaves_with_path(a), _float_leaves_with_path(b))}


def max_abs_diff(a, b) -> float:
  """max |a - b| over the float leaves of two trees of the same structure."""
  return max(leaf_diffs(a, b).values())


def worst_leaf(a, b) -> str:
  """The path of the float leaf where two trees differ most."""
  diffs = leaf_diffs(a, b)
  return max(diffs, key=diffs.get)


def per_example_grads_and_norms(loss_fn: LossFn, params, batch):
  """Plain JAX (no optax_dp): vmapped grads of batches of one, and their norms.

  Returns (grads with a leading batch axis, (B,) global L2 norms).
  """
  def one(p, example):
    return loss_fn(p, jax.tree.map(lambda x: x[None], example))

  g = jax.vmap(jax.grad(one), in_axes=(None, 0))(params, batch)
  return g, jnp.sqrt(sum(jnp.sum(l.reshape(l.shape[0], -1) ** 2, axis=1)
                         for l in jax.tree.leaves(g)))


def check_clips(loss_fn: LossFn, params, batch,
                l2_norm_clip: float) -> list[tuple[float, int]]:
  """The --check clip norms with how many examples each clips at `params`.

  The benchmark's C and the median per-example norm (about half clipped, so
  both branches of min(1, C / ||g||) are exercised).
  """
  norms = jax.jit(lambda p, b: per_example_grads_and_norms(loss_fn, p, b)[1])(
      params, batch)
  median = float(jnp.median(norms))
  return [(clip, int(jnp.sum(norms > clip))) for clip in (l2_norm_clip, median)]


def run_sigma0_steps(build: Callable[[], Row], params, batch, steps: int):
  """Builds a row (sigma = 0 warnings silenced) and runs `steps` jitted steps.

  Returns the params after them; `params` itself is not donated.
  """
  with quiet_sigma0():
    row = build()
    p, s = params, row.init(params)
    step = jax.jit(row.step)
    for _ in range(steps):
      p, s = step(p, s, batch)
  return p


def nnx_param_loss(model, loss_fn: LossFn) -> tuple[LossFn, Any]:
  """An NNX model's loss as a function of its `nnx.Param` state, and that state.

  `loss_fn(model, batch)` is the NNX loss; the result is a Linen-style
  `loss(params, batch)` (the model's other state, RNG streams included, held
  fixed), for the plain-JAX per-example norms of `check_clips`.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return (lambda p, batch: loss_fn(nnx.merge(graphdef, p, rest, copy=True),
                                   batch)), params


def auto_vmap_check(build: Callable[[str, float], Row], params0, batch,
                    clips: Sequence[tuple[float, int]], *, batch_size: int,
                    steps: int, rows: tuple[str, str] = ("optax_dp_auto",
                                                         "optax_dp_vmap"),
                    label: str = "") -> tuple[dict, bool]:
  """--check of a book-keeping row against its vmap row, at each clip norm.

  `build(name, clip)` builds a row with noise_multiplier 0; both rows of
  `rows` = (auto, vmap) run `steps` steps from `params0` (the Linen params,
  or an NNX row's `nnx.state`) on `batch`, and their params must agree within
  CHECK_RTOL of the vmap row's update. Prints a header and one line per clip
  norm; returns ({"C=...": the per-clip record}, whether all agreed).
  """
  auto, vmap = rows
  results, ok_all = {}, True
  for clip, n_clipped in clips:
    _common.print_check_header(batch_size, steps, clip, n_clipped, label)
    final = {name: run_sigma0_steps(lambda name=name: build(name, clip),
                                    params0, batch, steps) for name in rows}
    update = max_abs_diff(final[vmap], params0)
    diff = max_abs_diff(final[auto], final[vmap])
    worst = worst_leaf(final[auto], final[vmap])
    tol = _common.CHECK_RTOL * update
    ok = diff <= tol
    ok_all &= ok
    print(f"  max|{auto} - {vmap}| = {diff:.2e} (worst leaf {worst}), "
          f"{vmap} max|params - params0| = {update:.2e}, tolerance "
          f"{tol:.1e}: {'ok' if ok else 'MISMATCH'}")
    results[f"C={clip:.4g}"] = {
        "l2_norm_clip": clip, "examples_clipped": n_clipped,
        "rows": list(rows), "max_abs_diff_auto_vmap": diff,
        "worst_leaf": worst, "max_abs_update_vmap": update, "tolerance": tol}
  return results, ok_all


def plan_summary(plan: dict[str, str]) -> str:
  """`optax_dp.clipping_plan`'s rules, counted: "2 dense, 10 per-example"."""
  counts = collections.Counter(plan.values())
  return ", ".join(f"{n} {rule}" for rule, n in sorted(counts.items()))


def versions() -> dict:
  """Versions, the optax_dp git revision, machine, backend, XLA_FLAGS, load."""
  try:
    import jax_privacy  # pylint: disable=import-outside-toplevel
    jp = jax_privacy.__version__
  except ImportError:
    jp = "not installed"
  machine = _common.machine_info()
  import jaxlib  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # which optax_dp source was measured (dirty: uncommitted edits)
  git = _common.git_revision(root, "optax_dp")
  return {"optax_dp_git": git, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "optax": optax.__version__,
          "flax": flax.__version__, "jax_privacy": jp,
          "optax_dp": optax_dp.__version__, "python": platform.python_version(),
          "nproc": machine["nproc"], "cpu": machine["cpu"],
          "backend": jax.default_backend(), "devices": str(jax.devices()),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          "loadavg_at_start": _common.loadavg()}


def header(info: dict, setting: str, jax_privacy: bool = True) -> str:
  """The output's first line: versions, machine, `setting`, XLA_FLAGS, load."""
  return (f"jax {info['jax']}, optax {info['optax']}, flax {info['flax']}, "
          + (f"jax-privacy {info['jax_privacy']}, " if jax_privacy else "")
          + f"optax_dp {info['optax_dp']} ({info['optax_dp_git']}); "
          f"nproc {info['nproc']} ({info['cpu']}, {info['backend']}); "
          + setting
          + (f"; XLA_FLAGS={info['XLA_FLAGS']}" if info["XLA_FLAGS"] else "")
          + _common.loadavg_suffix(info["loadavg_at_start"]))


def nnx_row(name: str, make_model: Callable[[], Any], loss_fn: LossFn,
            batch_size: int, noise_multiplier: float, l2_norm_clip: float
            ) -> tuple[Row, Any]:
  """One of NNX_ROWS, and its initial state (`nnx.state(model)`).

  `loss_fn(model, batch)` is the loss one gives `nnx.grad`. The step merges
  the model and an `nnx.Optimizer(model, tx, wrt=nnx.Param)` from their
  states, calls `optimizer.update(model, grads)` with `nnx.grad(loss_fn)`
  (non-private), `optax_dp.clipped_grads(loss_fn, C)` (auto) or
  `optax_dp.per_example_grads(loss_fn)` (vmap), and splits them again: what
  `nnx.jit` does for a stateful step, written out so that all rows share one
  timing loop.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if name not in NNX_ROWS:
    raise ValueError(f"unknown row {name!r}; choose from {NNX_ROWS}")
  model = make_model()
  if name == "nnx_non_private":
    tx, grad_fn = sgd(), nnx.grad(loss_fn)
  else:
    tx = optax.chain(
        optax_dp.dp_aggregate(l2_norm_clip, noise_multiplier, row_key(name),
                              expected_batch_size=batch_size), sgd())
    grad_fn = (optax_dp.per_example_grads(loss_fn) if name == "nnx_optax_dp_vmap"
               else optax_dp.clipped_grads(loss_fn, l2_norm_clip))
  graphdef, state0 = nnx.split(model)
  opt_graphdef = nnx.graphdef(nnx.Optimizer(model, tx, wrt=nnx.Param))

  def init(state):
    return nnx.state(nnx.Optimizer(nnx.merge(graphdef, state), tx, wrt=nnx.Param))

  def step(state, opt_state, batch):
    model = nnx.merge(graphdef, state)
    optimizer = nnx.merge(opt_graphdef, opt_state)
    optimizer.update(model, grad_fn(model, batch))
    return nnx.state(model), nnx.state(optimizer)

  return Row(init, step), state0


def nnx_ratio_table(summary: dict, header: str, ms_format: str = ".0f") -> str | None:
  """The timed rows again as ratios to `nnx_non_private` (None without it):
  an NNX row's ratio is to the NNX step, Linen's to Linen's."""
  if "nnx_non_private" not in summary:
    return None
  nnx_summary = _common.summarize(
      {name: row["times_ms"] for name, row in summary.items()}, "nnx_non_private",
      {name: row.get("compile_s") for name, row in summary.items()})
  return _common.summary_table(
      f"The same rows, as ratios to nnx_non_private ({header})", nnx_summary,
      ms_format=ms_format, base="nnx_non_private")


def timing_tables(title: str, summary: dict, header: str,
                  ms_format: str = ".0f") -> tuple[str, dict]:
  """The run's tables, printed: `summary_table` under `title`, the NNX ratio
  table where NNX rows ran, framed by the load record (`_common.with_load`).
  Returns (the markdown, the load record)."""
  load = _common.load_record()
  table = _common.summary_table(title, summary, ms_format=ms_format)
  nnx_table = nnx_ratio_table(summary, header, ms_format=ms_format)
  if nnx_table:
    table += "\n\n" + nnx_table
  table = _common.with_load(table, load)
  print("\n" + table, flush=True)
  return table, load


def time_rows(rows: Sequence[str], build: Callable[[str], Row], params0, batch,
              rounds: int, ms_format: str = ".0f",
              params_of: Callable[[str], Any] | None = None) -> dict:
  """Compiles and warms up every row, then times them round-robin.

  Each row gets its own copy of `params0`, or of `params_of(name)` where
  given (an NNX row's model state); params and optimizer state are donated.
  Returns `_common.summarize`'s summary (ratios to `non_private`).
  """
  state, compiled, compile_s, costs = {}, {}, {}, {}
  for name in rows:
    row = build(name)
    start = params0 if params_of is None else params_of(name)
    params = jax.tree.map(jnp.copy, start)
    opt_state = row.init(params)
    t0 = time.perf_counter()
    compiled[name] = jax.jit(row.step, donate_argnums=(0, 1)).lower(
        params, opt_state, batch).compile()
    compile_s[name] = time.perf_counter() - t0
    costs[name] = hlo_cost(compiled[name])
    t0 = time.perf_counter()
    state[name] = jax.block_until_ready(
        compiled[name](params, opt_state, batch))   # warm-up step
    print(f"{name}: compiled in {compile_s[name]:.1f} s, warm-up step "
          f"{1e3 * (time.perf_counter() - t0):.0f} ms", flush=True)

  def run_step(name):
    params, opt_state = state[name]
    state[name] = jax.block_until_ready(compiled[name](params, opt_state, batch))

  times = _common.round_robin(rows, rounds, run_step, ms_format=ms_format)
  for name, (params, _) in state.items():
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params)):
      print(f"WARNING: non-finite params in {name} after timing")
  summary = _common.summarize(times, "non_private", compile_s)
  for name, cost in costs.items():
    summary[name].update(cost)
  print("\n" + cost_table(summary), flush=True)
  return summary


def hlo_cost(compiled) -> dict:
  """XLA's cost analysis of a compiled step: {"hlo_gflops", "hlo_gbytes_accessed"}
  (XLA's static estimate: what the step computes and moves, not its time)."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return {"hlo_gflops": cost.get("flops", float("nan")) / 1e9,
          "hlo_gbytes_accessed": cost.get("bytes accessed", float("nan")) / 1e9}


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_HLO_LINE = re.compile(r"=\s*(?P<result>\(.*?\)|\S+)\s+(?P<op>[a-z-]+?)(?:-start)?\(")
_HLO_SHAPE = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


def collective_bytes(compiled) -> dict[str, dict[str, int]]:
  """What a compiled step communicates, read from its optimized HLO:
  {collective: {"count", "bytes"}}, where bytes sums each collective's result
  per device (an all-gather's gathered array, a reduce-scatter's scattered
  piece, an all-reduce's reduced arrays), over every collective of that kind
  in the module (an async `-start` counted once, its `-done` not)."""
  out = {name: {"count": 0, "bytes": 0} for name in COLLECTIVES}
  for line in compiled.as_text().splitlines():
    match = _HLO_LINE.search(line)
    if not match or match.group("op") not in out:
      continue
    row = out[match.group("op")]
    row["count"] += 1
    for shape in _HLO_SHAPE.finditer(match.group("result")):
      if shape.group("dtype") in _DTYPE_BYTES:
        dims = [int(d) for d in shape.group("dims").split(",") if d]
        row["bytes"] += _DTYPE_BYTES[shape.group("dtype")] * math.prod(dims)
  return out


def cost_table(summary: dict, base: str = "non_private") -> str:
  """The rows' HLO cost analysis (`hlo_cost`) and its ratios to `base`: where
  a row's time goes beyond the baseline's, flops or memory traffic."""
  b = summary.get(base, {})
  rows = []
  for name, s in summary.items():
    if "hlo_gflops" not in s:
      continue
    ratio = lambda k: (_common.fmt_ratio(s[k] / b[k]) if b.get(k) else "n/a")
    rows.append([name, f"{s['hlo_gflops']:.3f}", ratio("hlo_gflops"),
                 f"{s['hlo_gbytes_accessed']:.3f}", ratio("hlo_gbytes_accessed")])
  return ("XLA cost analysis of each compiled step (a static estimate: a loop "
          "body, e.g. a scan over time, is counted once, not once per step; the "
          "noise's random-number generation counts as flops)\n\n"
          + _common.markdown_table(["row", "GFLOP", f"/ {base}", "GB accessed",
                                    f"/ {base}"], rows))
