"""Step time of one DP-SGD training step in PyTorch + Opacus (the peer baseline).

A PyTorch copy of the Flax Linen CNN in examples/models.py (NCHW 1x28x28: Conv(1->32, 3x3,
pad 1)-ReLU-AvgPool2-Conv(32->64, 3x3, pad 1)-ReLU-AvgPool2-Flatten(3136)-
Linear(256)-ReLU-Linear(10)), mean cross-entropy, SGD(lr 0.1, momentum 0.9),
C = 0.1, sigma = 1.34, random data, eager mode, torch.set_num_threads(2). Rows:

  torch_non_private  plain loss.backward() + optimizer.step()
  opacus_hooks       PrivacyEngine.make_private(grad_sample_mode="hooks")
                     (Opacus's default: materialises per-sample gradients)
  opacus_ghost       make_private(grad_sample_mode="ghost"), which also returns
                     the criterion wrapper that runs the two backward passes
                     of fast gradient ("ghost") clipping

Both Opacus rows use `poisson_sampling=False`, flat clipping and the PRV
accountant; the fixed batch is fed straight in (no DataLoader in the timed
loop), so the optimizer divides the clipped sum plus noise by B, as the JAX rows
do. Rows run round-robin (each round runs one step of every row) like
step_time.py. `--check` verifies with sigma = 0 on a batch of 16 that both
Opacus rows produce the same params after two steps as a manual clip / mean /
SGD-with-momentum reference, at C = 0.1 and at C = the median per-example norm.

Needs torch and opacus (benchmarks/requirements-peers.txt), in a separate venv:
  python3 -m venv /tmp/opacus-venv
  /tmp/opacus-venv/bin/pip install -r benchmarks/requirements-peers.txt
  /tmp/opacus-venv/bin/python benchmarks/opacus_step.py --check --rounds 10
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# First: _common reads the load average before torch is imported.
import _common  # pylint: disable=wrong-import-position

import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
from torch import nn  # pylint: disable=wrong-import-position

ALL_ROWS = ("torch_non_private", "opacus_hooks", "opacus_ghost")


def make_model(seed: int = 0) -> nn.Module:
  torch.manual_seed(seed)
  return nn.Sequential(
      nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
      nn.Flatten(), nn.Linear(3136, 256), nn.ReLU(), nn.Linear(256, 10))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
  """SGD with the benchmark's learning rate and momentum (as the JAX rows)."""
  return torch.optim.SGD(model.parameters(), lr=_common.LEARNING_RATE,
                         momentum=_common.MOMENTUM)


def make_batch(batch_size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size, 1, 28, 28), dtype=np.float32)
  labels = rng.integers(0, 10, size=(batch_size,), dtype=np.int64)
  return torch.from_numpy(images), torch.from_numpy(labels)


class Row:
  """One row: a model + optimizer (+ Opacus wrappers) and its `step(x, y)`."""

  def __init__(self, name, model, batch, noise_multiplier, l2_norm_clip):
    from opacus import PrivacyEngine  # pylint: disable=import-outside-toplevel
    self.name = name
    optimizer = _sgd(model)
    criterion = nn.CrossEntropyLoss()
    if name == "torch_non_private":
      self.model, self.optimizer, self.criterion = model, optimizer, criterion
      return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*batch), batch_size=len(batch[0]))
    engine = PrivacyEngine(accountant="prv")
    mode = {"opacus_hooks": "hooks", "opacus_ghost": "ghost"}[name]
    generator = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")   # secure-RNG and zero-noise warnings
      out = engine.make_private(
          module=model, optimizer=optimizer, criterion=criterion,
          data_loader=loader, noise_multiplier=noise_multiplier,
          max_grad_norm=l2_norm_clip, poisson_sampling=False,
          clipping="flat", grad_sample_mode=mode, noise_generator=generator)
    if mode == "ghost":
      self.model, self.optimizer, self.criterion, _ = out
    else:
      self.model, self.optimizer, _ = out
      self.criterion = criterion

  def step(self, x, y):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.criterion(self.model(x), y)
    loss.backward()   # ghost: the wrapper runs both backward passes
    self.optimizer.step()

  def params(self):
    return [p.detach().clone() for p in self.model.parameters()]


def build_row(name, batch, noise_multiplier=_common.NOISE_MULTIPLIER,
              l2_norm_clip=_common.L2_NORM_CLIP) -> Row:
  if name not in ALL_ROWS:
    raise ValueError(f"unknown row {name!r}; choose from {ALL_ROWS}")
  return Row(name, make_model(0), batch, noise_multiplier, l2_norm_clip)


def per_example_grads(model, x, y):
  """A loop of batch-of-one backward passes: [B][param] gradients."""
  out = []
  for i in range(len(x)):
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
    out.append([p.grad.detach().clone() for p in model.parameters()])
  return out


def reference_params(batch, l2_norm_clip, steps):
  """Manual clip / mean / SGD-momentum (sigma = 0)."""
  model = make_model(0)
  opt = _sgd(model)
  x, y = batch
  for _ in range(steps):
    grads = per_example_grads(model, x, y)
    summed = [torch.zeros_like(p) for p in model.parameters()]
    for g in grads:
      norm = torch.sqrt(sum(torch.sum(t * t) for t in g))
      factor = torch.clamp(l2_norm_clip / norm, max=1.0)
      for s, t in zip(summed, g):
        s += factor * t
    for p, s in zip(model.parameters(), summed):
      p.grad = s / len(x)
    opt.step()
  return [p.detach().clone() for p in model.parameters()]


def _max_abs_diff(a, b):
  return max(float(torch.max(torch.abs(u - v))) for u, v in zip(a, b))


def run_check(rows, batch_size: int = 16, steps: int = 2) -> dict:
  """sigma = 0, small batch: both Opacus rows must match the manual reference."""
  batch = make_batch(batch_size, seed=1)
  model0 = make_model(0)
  params0 = [p.detach().clone() for p in model0.parameters()]
  norms = torch.tensor([
      float(torch.sqrt(sum(torch.sum(t * t) for t in g)))
      for g in per_example_grads(model0, *batch)])
  median = float(torch.median(norms))
  clips = [(clip, int(torch.sum(norms > clip)))
           for clip in (_common.L2_NORM_CLIP, median)]

  def reference(clip):
    ref = reference_params(batch, clip, steps)
    return ref, _max_abs_diff(ref, params0)

  def row_diff(name, clip, ref):
    row = build_row(name, batch, 0.0, clip)
    for _ in range(steps):
      row.step(*batch)
    return _max_abs_diff(row.params(), ref)

  return _common.reference_check(
      rows, clips, reference=reference, row_diff=row_diff,
      base_rows=("torch_non_private",), batch_size=batch_size, steps=steps,
      name_width=18, what="the Opacus rows")


def versions() -> dict:
  import opacus  # pylint: disable=import-outside-toplevel
  machine = _common.machine_info()
  return {"torch": torch.__version__, "opacus": opacus.__version__,
          "numpy": np.__version__, "python": platform.python_version(),
          "nproc": machine["nproc"], "cpu": machine["cpu"],
          "torch_threads": torch.get_num_threads(),
          "loadavg_at_start": _common.loadavg()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps per row before the timed rounds")
  parser.add_argument("--rows", default=",".join(ALL_ROWS),
                      help=f"comma list from {','.join(ALL_ROWS)}")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--json-out", default=None)
  parser.add_argument("--check", action="store_true",
                      help="first verify (sigma=0, batch 16) that the Opacus rows "
                      "compute the same updated params as a manual reference")
  args = parser.parse_args(argv)
  rows = _common.parse_rows(parser, args, ALL_ROWS)
  torch.set_num_threads(args.threads)
  # Known, harmless for this benchmark: secure_mode off (a seeded generator is
  # used on purpose) and the hooks firing on the first layer, whose input
  # needs no gradient.
  warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
  warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")

  info = versions()
  header = (f"torch {info['torch']}, opacus {info['opacus']}; nproc {info['nproc']} "
            f"({info['cpu']}), torch threads {info['torch_threads']}, eager; "
            f"batch {args.batch_size}, {args.rounds} rounds, "
            f"C={_common.L2_NORM_CLIP}, sigma={_common.NOISE_MULTIPLIER}"
            + _common.loadavg_suffix(info["loadavg_at_start"]))
  print(header, flush=True)
  _common.print_start_load_warning()

  check = run_check(rows) if args.check else None

  batch = make_batch(args.batch_size)
  built = {}
  for name in rows:
    built[name] = build_row(name, batch)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
      built[name].step(*batch)
    print(f"{name}: {args.warmup} warm-up steps "
          f"{1e3 * (time.perf_counter() - t0) / max(args.warmup, 1):.0f} ms each",
          flush=True)

  times = _common.round_robin(rows, args.rounds,
                              lambda name: built[name].step(*batch))
  for name in rows:
    if not all(bool(torch.all(torch.isfinite(p))) for p in built[name].params()):
      print(f"WARNING: non-finite params in {name} after timing")

  load = _common.load_record()
  summary = _common.summarize(times, "torch_non_private")
  table = _common.with_load(_common.summary_table(
      f"Step time, batch {args.batch_size} ({header})", summary), load)
  print("\n" + table, flush=True)

  if args.json_out:
    _common.write_json(
        args.json_out, versions=info, batch_size=args.batch_size,
        rounds=args.rounds, warmup=args.warmup,
        l2_norm_clip=_common.L2_NORM_CLIP,
        noise_multiplier=_common.NOISE_MULTIPLIER, rows=summary, load=load,
        check=check, markdown=table)


if __name__ == "__main__":
  main()
