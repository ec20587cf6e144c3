"""``python -m samtune.demo prepare | pretrain``, the same as ``samtune demo ...``."""

import sys

from samtune.demo.pretrain import main
from samtune.errors import run_command

sys.exit(run_command(main, prog="samtune demo"))
