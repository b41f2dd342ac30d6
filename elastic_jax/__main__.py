import sys

from elastic_jax.cli import main

sys.exit(main())
