"""`python -m kimina_jax.report`: the command line in report/cli.py."""
import sys

from kimina_jax.report.cli import main

sys.exit(main())
