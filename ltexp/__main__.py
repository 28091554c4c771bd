"""`python -m ltexp` is the same as the `ltexp` console script."""

from ltexp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
