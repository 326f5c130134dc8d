"""``python -m vitedge``: the ``vitedge`` command."""

from vitedge.cli import main

if __name__ == "__main__":
    main()
