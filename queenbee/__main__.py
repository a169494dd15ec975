"""`python -m queenbee` runs the queen."""

from queenbee.cli import main

raise SystemExit(main())
