"""`python -m workerbee` runs the worker."""

from workerbee.cli import main

raise SystemExit(main())
