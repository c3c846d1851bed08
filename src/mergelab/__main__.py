"""``python -m mergelab``: the command line."""

from mergelab.cli import main

main()
