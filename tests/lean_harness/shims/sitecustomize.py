"""Lets kimina-ast-server's client models import on Python < 3.12 (SPEC 11).

pydantic refuses `typing.TypedDict` before Python 3.12; the server's models use it, so point it at
`typing_extensions.TypedDict`. Loaded only by the server's own venv (PYTHONPATH set by the harness).
"""
import sys

if sys.version_info < (3, 12):
    import typing

    import typing_extensions

    typing.TypedDict = typing_extensions.TypedDict
