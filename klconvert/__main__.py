"""`python -m klconvert` runs the CLI."""
from klconvert.cli import main

main()
