"""`python -m tlora`: see tlora.cli."""
from .cli import main

raise SystemExit(main())
