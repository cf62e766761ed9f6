"""``python -m rbit``: the same as the ``rbit`` command."""

from .cli import main

if __name__ == "__main__":
    main()
