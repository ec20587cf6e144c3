"""``python -m samtune.demo prepare | pretrain``: generate the demo splits, or pretrain (and install) the base."""

import sys

from samtune.demo.pretrain import main
from samtune.errors import run_command

sys.exit(run_command(main, prog="python -m samtune.demo"))
