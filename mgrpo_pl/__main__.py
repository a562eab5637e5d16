"""``python -m mgrpo_pl`` runs the ``mgrpo`` command."""

from mgrpo_pl.cli import main

main()
