"""`python -m pdserve_tools.sim`: the same as `pdserve sim` (see `pdserve_tools.sim.command`)."""

from __future__ import annotations

import argparse
import sys

from pdserve_tools.sim.command import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pdserve_tools.sim", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
