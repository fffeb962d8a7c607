"""MNIST from the four standard IDX .gz files (no TensorFlow needed).

The files in `examples/data/mnist/` are the original MNIST files by Yann LeCun,
Corinna Cortes and Christopher J.C. Burges, CC BY-SA 3.0 (see the README
there).
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def read_idx(path: str) -> np.ndarray:
  """Reads one (optionally gzipped) IDX file into a uint8 array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4:
    raise ValueError(f"{path}: too short for an IDX file.")
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()}).")
  shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
  body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says {shape}, found {body.size} bytes of data.")
  return body.reshape(shape)


def load_mnist(data_dir: str = DEFAULT_DATA_DIR) -> dict[str, np.ndarray]:
  """Returns train/test images (float32 NHWC in [0, 1]) and labels (int32),
  from MNIST's four IDX files or any dataset in the same format and file
  names (Fashion-MNIST)."""
  missing = [name for name in FILES.values()
             if not os.path.exists(os.path.join(data_dir, name))]
  if missing:
    raise FileNotFoundError(
        f"IDX files {missing} not found in {data_dir}. Point --data-dir at a "
        "folder with the four standard IDX .gz files (MNIST, or Fashion-MNIST: "
        "Debian's dataset-fashion-mnist package installs them; or use --data tfds).")
  raw = {k: read_idx(os.path.join(data_dir, v)) for k, v in FILES.items()}
  out = {}
  for split in ("train", "test"):
    images = raw[f"{split}_images"].astype(np.float32)[..., None] / 255.0
    labels = raw[f"{split}_labels"].astype(np.int32)
    if images.shape[0] != labels.shape[0]:
      raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels.")
    out[f"{split}_images"], out[f"{split}_labels"] = images, labels
  return out


def load_mnist_tfds(name: str = "mnist") -> dict[str, np.ndarray]:
  """The same arrays through tensorflow-datasets (the optional `tfds` extra);
  `name="fashion_mnist"` for Fashion-MNIST."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(
        "--data tfds needs tensorflow-datasets and tensorflow: "
        "pip install -e '.[tfds]' in the clone. The default (--data idx) needs neither.") from e
  out = {}
  for split in ("train", "test"):
    ds = tfds.as_numpy(tfds.load(name, split=split, batch_size=-1))
    out[f"{split}_images"] = ds["image"].astype(np.float32) / 255.0
    out[f"{split}_labels"] = ds["label"].astype(np.int32)
  return out
