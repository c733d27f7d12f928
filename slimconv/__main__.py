"""`python -m slimconv` is the `slimconv` command (handy where the venv's scripts are not on PATH)."""
import sys

from .cli import main

sys.exit(main())
