"""``python -m driml_pl`` and the ``driml_pl`` console script: help, version and bad commands are answered before
torch or Lightning is imported (`driml_pl.commands`)."""

import sys


def run() -> None:
    from driml_pl.commands import dispatch

    dispatch(sys.argv[1:])
    from driml_pl.cli import main

    main()


if __name__ == "__main__":
    run()
