"""``python -m netcarve.cli``: the same as the ``netcarve`` command."""

from netcarve.cli.main import main

main()
