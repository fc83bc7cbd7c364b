"""Entry point: `python -m megalite.train [--config run.yaml] [Megatron-style flags]`.

Run it directly for one process, or under torchrun (launch/pretrain.sh) for many.
"""

import sys

from megalite.config import parse_config
from megalite.errors import run_main


def main(argv=None):
    cfg = parse_config(argv)
    from megalite.training.loop import pretrain

    pretrain(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
