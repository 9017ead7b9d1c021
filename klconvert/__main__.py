"""`python -m klconvert` runs the CLI."""
from klconvert.entry import main

main()
