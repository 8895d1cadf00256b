"""The ``netcarve`` command line: argument parsing and calls into the library, no method logic.

:mod:`~netcarve.cli.main` holds the command group and the circuit commands; the other modules
hold one command group each (:mod:`~netcarve.cli.car`, :mod:`~netcarve.cli.featureviz`,
:mod:`~netcarve.cli.diagram`, :mod:`~netcarve.cli.reproduce`) and the
shared options, error handling and output folders (:mod:`~netcarve.cli.common`,
:mod:`~netcarve.cli.errors`, :mod:`~netcarve.cli.run_folder`).
"""

from netcarve.cli.main import cli, main

__all__ = ["cli", "main"]
