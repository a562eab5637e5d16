"""``python -m mgrpo_pl`` runs the ``mgrpo`` command."""

from mgrpo_pl.cli import cli_main

cli_main()
