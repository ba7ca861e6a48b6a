"""``python -m m2d2_embed`` runs the ``m2d2-embed`` command line."""

from .cli import main

raise SystemExit(main())
