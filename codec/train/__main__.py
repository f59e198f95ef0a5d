"""``python -m codec.train ...``: the same command as ``codec train``."""

import argparse
import sys

from .cli import fill_parser, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m codec.train", description="Train an autoencoder.")
    fill_parser(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint and --out snapshot are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
