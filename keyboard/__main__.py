"""`python -m keyboard`: the same as the `keyboard` command."""

import sys

from keyboard.cli import main

sys.exit(main())
