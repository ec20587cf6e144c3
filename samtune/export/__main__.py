"""``python -m samtune.export``: the same as ``samtune export``."""

import sys

from samtune.errors import run_command
from samtune.export import main

sys.exit(run_command(main, prog="samtune export"))
