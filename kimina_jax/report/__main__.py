import sys

from kimina_jax.report.cli import main

sys.exit(main())
