"""`python -m moelab` runs the command line."""

from moelab.cli import main

main()
