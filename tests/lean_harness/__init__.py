"""Test harness for the real Kimina Lean Server (PyPI kimina-ast-server) with a stand-in REPL that is NOT Lean."""
