"""``python -m signal_drift COMMAND ...``: the same as the ``signal-drift`` console command."""

from .cli import main

if __name__ == "__main__":
    main()
