"""`python -m loda_cli` runs the command line (also how torchrun starts it)."""

from loda_cli.cli.main import main

if __name__ == "__main__":
    main()
