"""`python -m diffcse` runs the command line."""

import sys

from diffcse.cli import main

sys.exit(main())
