"""`python -m zturbo ...` and `torchrun -m zturbo ...`."""

from zturbo.cli import main

if __name__ == "__main__":
    main()
