import sys

from sail_jax.cli import main

sys.exit(main())
