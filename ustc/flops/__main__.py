"""``python -m ustc.flops``."""

from ustc.flops.cli import main

main()
