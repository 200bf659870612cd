"""``python -m ftkit``: the same CLI, for launchers such as ``torchrun -m ftkit``."""

from ftkit.cli import main

if __name__ == "__main__":
    main()
