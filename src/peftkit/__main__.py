"""``python -m peftkit``: the command line."""

from peftkit.cli import main

if __name__ == "__main__":
    main()
