"""`python -m mailgrid`: the same as the `mailgrid` command."""

from mailgrid.cli import main

raise SystemExit(main())
