"""`python -m scrcl_cli` runs the command-line interface."""

from scrcl_cli.cli import main

main()
