"""``python -m loadstone.testing``: write tiny checkpoints and adapters from a shell."""

from .checkpoints import main

raise SystemExit(main())
