"""`python -m tlogserver`."""

from .cli import main

main()
