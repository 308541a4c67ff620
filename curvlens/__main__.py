"""``python -m curvlens`` runs the command line interface."""

from curvlens.cli import main

raise SystemExit(main())
