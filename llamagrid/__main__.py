"""`python -m llamagrid` = the `llamagrid` command."""

import sys

from llamagrid.cli import main

sys.exit(main())
