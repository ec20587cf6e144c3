"""``python -m samtune.demo prepare | pretrain``: generate the demo splits, or pretrain (and install) the base."""

from samtune.demo.pretrain import main

main()
