"""`python -m moelab` runs the command line."""

from moelab import command

command()
