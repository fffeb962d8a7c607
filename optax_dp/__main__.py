"""`python -m optax_dp epsilon|calibrate ...`: see `optax_dp._cli`."""

import sys

from optax_dp._cli import main

if __name__ == "__main__":
  sys.exit(main())
